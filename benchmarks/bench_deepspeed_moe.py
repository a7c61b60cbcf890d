"""GranularMoE (``granular_moe.deepspeed``) against DeepSpeed's own ``deepspeed.moe.layer.MoE``, side by side in one
run: the layer's step time (forward + backward of ``out.square().mean() + 0.01 * l_aux``, median of ``--reps`` after
one warm-up) and the bytes its forward keeps for the backward (``granular_moe.memory.SavedForBackward``: every
storage autograd saves, once, without the parameters and the input).

Rows: DeepSpeed's ``MoE`` and ``GranularMoE`` at top-k 1 and 2 with the same ``E`` experts (``GranularMoE``'s weights
copied from ``MoE``'s), then ``GranularMoE`` at granularity ``G`` 4, 16, 64 (``E * G`` experts of ``d_ff / G`` cut from
the same experts, top ``k * G``), where DeepSpeed's layer cannot go (it loops over its local experts, and its gate is
documented for top-1 / top-2 while the fine-grained form needs top ``k * G``). Both layers dropless
(``drop_tokens=False``: every assignment computed; DeepSpeed's layer then sizes its per-expert buffers to the busiest
expert), GELU experts ``d -> d_ff -> d`` without biases, one process (a one-rank gloo group), fp32, the input
requiring its gradient as inside a model.

    python benchmarks/bench_deepspeed_moe.py --out benchmarks/results        # the README's table (CPU defaults)
    python benchmarks/bench_deepspeed_moe.py --tiny --out /tmp/bench          # seconds: a check that it runs

Prints a Markdown table and writes ``deepspeed_moe.json`` (rows plus provenance).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
if not ON_CUDA:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed's first import

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from granular_moe.memory import SavedForBackward  # noqa: E402
from provenance import provenance  # noqa: E402

DEFAULT_SHAPES = dict(tokens=2048, d_model=256, d_ff=1024, experts=8, gs="4,16,64", reps=3)
TINY_SHAPES = dict(tokens=64, d_model=32, d_ff=64, experts=4, gs="4,16", reps=1)
AUX_COEFFICIENT = 0.01


def one_process_world() -> None:
    if dist.is_initialized():
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)
    from granular_moe.deepspeed.groups import ensure_deepspeed_comm

    ensure_deepspeed_comm()


def base_experts(args, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``E`` GELU experts: ``fc1 [E, d_ff, d]``, ``fc2 [E, d, d_ff]`` (``nn.Linear`` layouts)."""
    fc1 = torch.randn(args.experts, args.d_ff, args.d_model, generator=generator) * args.d_model ** -0.5
    fc2 = torch.randn(args.experts, args.d_model, args.d_ff, generator=generator) * args.d_ff ** -0.5
    return fc1, fc2


def expert_module(args) -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(args.d_model, args.d_ff, bias=False), torch.nn.GELU(),
                               torch.nn.Linear(args.d_ff, args.d_model, bias=False))


@torch.no_grad()
def deepspeed_layer(args, k, router, fc1, fc2):
    from deepspeed.moe.layer import MoE

    layer = MoE(args.d_model, expert_module(args), num_experts=args.experts, k=k, drop_tokens=False, use_rts=False,
                top2_2nd_expert_sampling=False)
    layer.set_deepspeed_parallelism()
    layer.deepspeed_moe.gate.wg.weight.copy_(router)
    for index, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
        expert[0].weight.copy_(fc1[index])
        expert[2].weight.copy_(fc2[index])
    return layer


@torch.no_grad()
def granular_layer(args, k, granularity, router, fc1, fc2):
    from granular_moe.deepspeed import GranularMoE

    layer = GranularMoE(args.d_model, expert_module(args), num_experts=args.experts, k=k, drop_tokens=False,
                        granularity=granularity, kernels=args.kernels)
    layer.deepspeed_moe.router.weight.copy_(router.repeat_interleave(granularity, dim=0))
    layer.load_base_experts(fc1, fc2)
    return layer


def measure(layer, x, reps: int) -> dict:
    """Median ms of forward + backward, bytes saved for backward, and the output (for the same-work check)."""
    parameters = list(layer.parameters())

    def step():
        for parameter in parameters:
            parameter.grad = None
        output, l_aux, _ = layer(x)
        (output.square().mean() + AUX_COEFFICIENT * l_aux).backward()
        return output

    output = step()
    times = []
    for _ in range(reps):
        if ON_CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if ON_CUDA:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    with SavedForBackward(exclude=[*parameters, x]) as saved:
        out, l_aux, _ = layer(x)
    del out, l_aux
    return {"ms": statistics.median(times), "saved_bytes": saved.nbytes, "output": output.detach()}


def run(args) -> list[dict]:
    one_process_world()
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    fc1, fc2 = base_experts(args, generator)
    router = torch.randn(args.experts, args.d_model, generator=generator) * args.d_model ** -0.5
    x = torch.randn(args.tokens, args.d_model, generator=generator).to(DEVICE).requires_grad_()
    rows = []
    for k in (1, 2):
        reference = None
        for impl, granularity in [("deepspeed", 1), ("granular", 1)] + [("granular", g) for g in args.granularities]:
            if impl == "deepspeed":
                layer = deepspeed_layer(args, k, router, fc1, fc2)
            else:
                layer = granular_layer(args, k, granularity, router, fc1, fc2)
            result = measure(layer.to(DEVICE), x, args.reps)
            output = result.pop("output")
            row = {"impl": impl, "k": k, "G": granularity, "experts": args.experts * granularity,
                   "topk": k * granularity, **result,
                   "saved_bytes_per_token": result["saved_bytes"] / args.tokens}
            if granularity == 1:
                reference = output if reference is None else reference
                row["max_difference_to_deepspeed"] = (output - reference).abs().max().item()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| layer | k | G | experts | top-k | ms / step | saved for backward (MiB) | bytes / token |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        name = "DeepSpeed MoE" if row["impl"] == "deepspeed" else "GranularMoE"
        lines.append(f"| {name} | {row['k']} | {row['G']} | {row['experts']} | {row['topk']} | {row['ms']:.1f} | "
                     f"{row['saved_bytes'] / 2 ** 20:.1f} | {row['saved_bytes_per_token']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small shapes a CPU runs in seconds")
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--d-model", type=int)
    parser.add_argument("--d-ff", type=int)
    parser.add_argument("--experts", type=int, help="experts before granularity (E)")
    parser.add_argument("--gs", help="granularities beyond 1, comma separated")
    parser.add_argument("--reps", type=int)
    parser.add_argument("--kernels", default="auto", help="GranularMoE's kernels: auto or torch")
    parser.add_argument("--out", default=".", help="folder for deepspeed_moe.json")
    args = parser.parse_args(argv)
    for name, value in (TINY_SHAPES if args.tiny else DEFAULT_SHAPES).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.granularities = [int(g) for g in args.gs.split(",") if g]
    bad = [g for g in args.granularities if args.d_ff % g]
    if bad:
        parser.error(f"--gs {args.gs}: {bad} do not divide --d-ff {args.d_ff}")
    info = provenance() | {"tokens": args.tokens, "d_model": args.d_model, "d_ff": args.d_ff,
                           "experts": args.experts, "reps": args.reps, "dtype": "fp32", "dropless": True,
                           "threads": torch.get_num_threads(), "kernels": args.kernels,
                           "load_average_at_start": os.getloadavg(),
                           "command": "python benchmarks/bench_deepspeed_moe.py " + " ".join(argv or sys.argv[1:])}
    print(json.dumps(info), flush=True)
    rows = run(args)
    info["load_average_at_end"] = os.getloadavg()  # other jobs on the machine slow the times, not the bytes
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "deepspeed_moe.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    print(table(rows))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
