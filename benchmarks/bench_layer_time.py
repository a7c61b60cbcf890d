"""Forward + backward time of one granular MoE layer, this checkout against an earlier commit, side by side.

Each side runs in its own child process importing ``granular_moe`` from its own tree (``--baseline REV`` is
checked out with ``git worktree`` into a temporary folder, then removed); the two alternate for ``--rounds``
rounds, each round timing ``--iterations`` forward + backward passes after a warm-up, so that whatever else
the machine does falls on both alike. Reports each side's median over rounds and their ratio.

    python benchmarks/bench_layer_time.py --baseline 0c94727 --out benchmarks/results   # G 16, d 1024, fp32

Writes ``layer_time.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = dict(granularity=16, d_model=1024, d_ff=4096, experts=8, topk=2, tokens=512, dtype="fp32",
                kernels="torch", rounds=5, iterations=3)


def child(spec: dict) -> None:
    """In the child: build the layer from ``granular_moe`` as found on ``PYTHONPATH``, time it, print JSON."""
    import time

    import torch
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    from granular_moe import GranularMoELayer
    from granular_moe.config import apply_granularity

    torch.set_num_threads(spec["threads"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    config = apply_granularity(TransformerConfig(
        num_layers=1, hidden_size=spec["d_model"], num_attention_heads=8, ffn_hidden_size=spec["d_ff"],
        num_moe_experts=spec["experts"], moe_router_topk=spec["topk"], moe_aux_loss_coeff=1e-2,
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu, use_cpu_initialization=True,
        params_dtype=dtype, hidden_dropout=0.0, attention_dropout=0.0), spec["granularity"])
    torch.manual_seed(0)
    layer = GranularMoELayer(config, layer_number=1, kernels=spec["kernels"])
    x = torch.randn(spec["tokens"], 1, spec["d_model"], dtype=dtype, requires_grad=True)

    def step():
        out, _ = layer(x)
        out.float().square().sum().backward()

    step()  # warm-up
    times = []
    for _ in range(spec["iterations"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"seconds": statistics.median(times)}))


def run_side(tree: Path, spec: dict) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree))
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True,
                            text=True, check=False, cwd=tree)
    if result.returncode != 0:
        raise SystemExit(f"the layer timing at {tree} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["seconds"]


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="the commit to compare with (e.g. 0c94727)")
    for name, value in DEFAULTS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads per side")
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for layer_time.json")
    args = parser.parse_args(argv)
    spec = {name: getattr(args, name) for name in (*DEFAULTS, "threads") if name not in ("rounds",)}
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from provenance import commit, provenance

    with tempfile.TemporaryDirectory() as folder:
        baseline_tree = Path(folder) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(baseline_tree), args.baseline], cwd=ROOT,
                       check=True, capture_output=True)
        try:
            sides = {"this checkout": [], f"baseline {args.baseline}": []}
            for _ in range(args.rounds):
                sides["this checkout"].append(run_side(ROOT, spec))
                sides[f"baseline {args.baseline}"].append(run_side(baseline_tree, spec))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(baseline_tree)], cwd=ROOT, check=False,
                           capture_output=True)
    medians = {side: statistics.median(times) for side, times in sides.items()}
    ours, theirs = medians.values()
    print(f"G {args.granularity}, d_model {args.d_model}, d_ff {args.d_ff}, E {args.experts} top-{args.topk} before "
          f"G, SwiGLU, {args.tokens} tokens, {args.dtype}, --moe-kernels {args.kernels}, {args.threads} threads: "
          f"forward + backward, median of {args.rounds} rounds x {args.iterations}")
    print("| side | ms | rounds (ms) |\n|---|---|---|")
    for side, times in sides.items():
        print(f"| {side} | {medians[side] * 1e3:.1f} | {', '.join(f'{t * 1e3:.0f}' for t in times)} |")
    print(f"ratio this checkout / baseline: {ours / theirs:.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "layer_time.json").write_text(json.dumps({
        "info": provenance() | {"commit": commit(), "baseline": args.baseline}, "spec": spec, "rounds": args.rounds,
        "seconds": sides, "median_seconds": medians, "ratio": ours / theirs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
