"""What a Hugging Face conversion costs as the model grows: peak resident memory and wall time of ``granular-moe
import-hf`` and ``export-hf`` for the same Qwen3-MoE-shaped model at several depths (and a wide one), with one
worker and several.

Each size gets a random Hugging Face folder (fp32, one ``safetensors`` file per layer, written here from the
family's own mappings), which ``import-hf`` converts to a checkpoint and ``export-hf`` converts back (its shards
``--max-shard-size``); every conversion runs as its own process, timed from start to exit. Memory: the
largest resident set of any of its processes (the kernel's ``ru_maxrss``), and the sum of the proportional
sets (``Pss``: pages forked workers share count once) over the conversion's processes (coordinator and
workers), sampled every 50 ms. Time: wall seconds per process (the start, imports included, is a fixed part of
it; ``--repeats``: the median of several runs), and a least-squares line ``wall = start + per_tensor x
tensors`` over the depths for each conversion and worker count, with its largest relative residual.
``--whole`` adds the export as it was before streaming (the whole model loaded by megatron-core at TP = PP =
EP = 1 and converted at once), for contrast.

Prints a table and writes ``hf_convert.json``::

    python benchmarks/bench_hf_convert.py --whole --repeats 3 --out benchmarks/results
    python benchmarks/bench_hf_convert.py --layers 2 3 --hidden 64 --experts 4 --width 32 --workers 1 --no-wide
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from provenance import ROOT, provenance

WHOLE_EXPORT = """
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
from granular_moe.hf.families import FAMILIES
from granular_moe.hf.mappings import to_hf
from granular_moe.hf.megatron_io import load_model, single_process_world
with single_process_world():
    args, model = load_model(Path(sys.argv[1]))
    tensors = to_hf(model.state_dict(), FAMILIES["qwen3_moe"].mappings(args, args.padded_vocab_size))
save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, sys.argv[2])
"""


def model_flags(layers: int, hidden: int, experts: int, width: int) -> list[str]:
    """A Qwen3-MoE-shaped model: 4 heads in 2 key/value groups, q/k norms, ``experts`` experts of ``width``."""
    return ["--num-layers", str(layers), "--hidden-size", str(hidden), "--ffn-hidden-size", str(4 * hidden),
            "--num-attention-heads", "4", "--group-query-attention", "--num-query-groups", "2", "--qk-layernorm",
            "--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
            "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--seq-length", "64",
            "--num-experts", str(experts), "--moe-ffn-hidden-size", str(width), "--moe-router-topk", "2"]


def make_folder(folder: Path, flags: list[str], vocab: int = 2048) -> tuple[int, int]:
    """A random fp32 folder of the model ``flags`` describe; returns (tensors, bytes)."""
    import torch
    from safetensors.torch import save_file

    from granular_moe.hf.families import FAMILIES
    from granular_moe.hf.megatron_io import one_process_args
    from granular_moe.hf.safetensors_io import INDEX_FILE
    from granular_moe.hf.targets import parse_model_flags

    args = one_process_args(parse_model_flags(flags))
    args.padded_vocab_size = vocab
    family = FAMILIES["qwen3_moe"]
    folder.mkdir(parents=True)
    family.config(args, vocab, {"eos": 2, "pad": 0}, "float32").save_pretrained(str(folder))
    groups: dict = {}
    for mapping in family.mappings(args, vocab):
        groups.setdefault(mapping.layer, {}).update(mapping.hf_shapes())
    generator = torch.Generator().manual_seed(0)
    weight_map, total, count = {}, 0, 0
    for number, shapes in enumerate(groups.values()):
        name = f"part-{number:05d}.safetensors"
        tensors = {key: 0.02 * torch.randn([size for size, _ in shape], generator=generator)
                   for key, shape in shapes.items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        total += sum(t.numel() * 4 for t in tensors.values())
        count += len(tensors)
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return count, total


def _tree_pss(pid: int) -> int:
    """Proportional resident bytes of ``pid`` and its descendants (``Pss`` from /proc: a page shared by forked
    workers counts once in the sum)."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            rollup = Path(f"/proc/{current}/smaps_rollup").read_text()
            total += int(next(line.split()[1] for line in rollup.splitlines() if line.startswith("Pss:"))) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                stack += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


def measure(argv: list[str]) -> dict:
    """Run ``argv`` as a process: wall seconds, the largest process's peak RSS, the sampled peak of the sum."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _tree_pss(process.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    stdout, stderr = process.stdout.read().decode(), process.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{stderr[-3000:]}{stdout[-1000:]}")
    return {"wall_s": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "peak_sum_pss_mb": round(peak[0] / 2**20, 1)}


def measure_repeated(argv: list[str], repeats: int, output: Path) -> dict:
    """:func:`measure` ``repeats`` times (``output`` removed before each run): the median wall time, the largest
    peaks, and every run's wall time."""
    runs = []
    for _ in range(repeats):
        shutil.rmtree(output, ignore_errors=True)
        runs.append(measure(argv))
    walls = sorted(run["wall_s"] for run in runs)
    return {"wall_s": walls[len(walls) // 2], "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
            "peak_sum_pss_mb": max(run["peak_sum_pss_mb"] for run in runs), "walls_s": [run["wall_s"] for run in runs]}


def linear_fits(rows: list[dict], hidden: int) -> list[dict]:
    """``wall = start + per_tensor x tensors`` by least squares over the depths (the models ``hidden`` wide), for
    each conversion and worker count with two or more depths."""
    fits = []
    for what, workers in dict.fromkeys((row["what"], row["workers"]) for row in rows):
        points = [(row["tensors"], row["wall_s"]) for row in rows
                  if (row["what"], row["workers"], row["hidden"]) == (what, workers, hidden)]
        if len(points) < 2:
            continue
        mean_x = sum(x for x, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
        start = mean_y - slope * mean_x
        residual = max(abs(y - start - slope * x) / y for x, y in points)
        fits.append({"what": what, "workers": workers, "start_s": round(start, 3),
                     "ms_per_tensor": round(1000 * slope, 4), "largest_residual": round(residual, 4)})
    return fits


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16, 32, 64])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--width", type=int, default=128, help="each expert's FFN width")
    parser.add_argument("--wide", dest="wide", action="store_true", default=True,
                        help="also a wide model: 4 layers at 4 x --hidden, 2 x --experts of 4 x --width (default)")
    parser.add_argument("--no-wide", dest="wide", action="store_false")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--max-shard-size", default="50MB")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each conversion: the median wall time and the largest peaks are reported")
    parser.add_argument("--whole", action="store_true", help="also the export with the whole model in memory")
    parser.add_argument("--tokenizer-model", type=Path, default=None,
                        help="SentencePiece model for the export (default: the embedded corpus's, 2048 pieces)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    tokenizer = args.tokenizer_model
    if tokenizer is None:
        from granular_moe.training.corpus import embedded_corpus

        tokenizer = Path(embedded_corpus(2048, 300000).tokenizer_model)
    shapes = [(layers, args.hidden, args.experts, args.width) for layers in args.layers]
    if args.wide:
        shapes.append((4, 4 * args.hidden, 2 * args.experts, 4 * args.width))
    python = [sys.executable, "-m", "granular_moe.cli"]
    rows = []
    root = Path(tempfile.mkdtemp(prefix="hf-convert-"))
    try:
        for layers, hidden, experts, width in shapes:
            folder = root / f"hf-{layers}-{hidden}"
            tensors, nbytes = make_folder(folder, model_flags(layers, hidden, experts, width))
            shape = {"layers": layers, "hidden": hidden, "experts": experts, "expert_width": width,
                     "tensors": tensors, "mb": round(nbytes / 1e6, 1)}
            for workers in args.workers:
                save, output = root / f"ckpt-{layers}-{hidden}-{workers}", root / f"out-{layers}-{hidden}-{workers}"
                imported = measure_repeated([*python, "import-hf", "--model", str(folder), "--save", str(save),
                                             "--workers", str(workers)], args.repeats, save)
                rows.append({"what": "import-hf", **shape, "workers": workers, **imported})
                exported = measure_repeated([*python, "export-hf", "--load", str(save), "--output", str(output),
                                             "--max-shard-size", args.max_shard_size, "--tokenizer-model",
                                             str(tokenizer), "--workers", str(workers)], args.repeats, output)
                rows.append({"what": "export-hf", **shape, "workers": workers, **exported})
                shutil.rmtree(output)
                if workers != args.workers[0]:
                    shutil.rmtree(save)
            if args.whole:
                save = root / f"ckpt-{layers}-{hidden}-{args.workers[0]}"
                whole = measure_repeated([sys.executable, "-c", WHOLE_EXPORT, str(save),
                                          str(root / "whole.safetensors")], args.repeats, root / "whole.safetensors")
                rows.append({"what": "export, whole model (before streaming)", **shape, "workers": 1, **whole})
                (root / "whole.safetensors").unlink()
            shutil.rmtree(root / f"ckpt-{layers}-{hidden}-{args.workers[0]}", ignore_errors=True)
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    header = (f"{'conversion':<40} {'layers':>6} {'hidden':>6} {'tensors':>7} {'MB':>8} {'workers':>7} "
              f"{'wall s':>7} {'peak RSS MB':>11} {'sum PSS MB':>10}")
    print(header)
    for row in rows:
        print(f"{row['what']:<40} {row['layers']:>6} {row['hidden']:>6} {row['tensors']:>7} {row['mb']:>8} "
              f"{row['workers']:>7} {row['wall_s']:>7} {row['peak_rss_mb']:>11} {row['peak_sum_pss_mb']:>10}")
    fits = linear_fits(rows, args.hidden)
    for fit in fits:
        print(f"{fit['what']}, {fit['workers']} worker(s): wall = {fit['start_s']:.2f} s + "
              f"{fit['ms_per_tensor']:.3f} ms x tensors (largest residual {100 * fit['largest_residual']:.1f}%)")
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/bench_hf_convert.py " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / "hf_convert.json").write_text(json.dumps(
        {"provenance": provenance(), "command": command.strip(), "rows": rows, "fits": fits}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
