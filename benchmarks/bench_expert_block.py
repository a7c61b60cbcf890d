"""The expert block of a fine-grained MoE, forward + backward, per granularity G: ms, TFLOP/s, peak memory.

Work (the README's expert-block table): T tokens of width d, a dense FFN d -> d_ff -> d; MoE
with E experts and top-k routing made fine-grained by G: E*G experts of hidden d_ff/G, top-(k*G). Every
column does the same work from the same routing (``x``, expert ids and gates given) to the combined
output ``[T, d]``, then the backward for ``x`` and the expert weights (the gates are constants):

    FLOPs = 3 (forward + backward) * 2 (per multiply-add) * T * k * d * d_ff * (2, or 3 with --gated)

(the dense column does the same count with one expert of width k * d_ff). Columns:

* ``dense``: one MLP, the floor to beat.
* ``loop``: sort tokens, one matmul pair per expert, ``index_add`` combine (megatron-core SequentialMLP
  style; skipped above ``--loop-max-experts``).
* ``grouped_mm``: gather, ``torch._grouped_mm`` twice, ``index_add`` (CUDA only; the sort is outside
  the timed step, as in the anchors).
* ``ours_torch`` / ``ours_triton``: this package's ``dispatch_plan`` + ``grouped_mlp`` (the gates scaling the
  activations) + plain-sum ``combine`` from ``--moe-kernels torch`` / ``triton``, as the layer runs them (routing
  metadata inside the timed step; Triton on CUDA only).
* ``scattermoe``: ScatterMoE's MLP (GLUMLP with ``--gated``) when ``--scattermoe-path`` names a folder
  holding its source (a local copy, never committed), given the same expert weights.

Before timing, every MoE column's output must equal ``ours_torch``'s to within the rounding of the dtype
(``difference`` in the JSON): a column that computes something else is reported as an error, not timed.

Peak memory is ``torch.cuda.max_memory_allocated`` above what the inputs hold, in MiB (``null`` on CPU).
Defaults are the README's shapes (T=16384, d=2048, d_ff=8192, E=8, k=1, bf16, G=1..64) on a GPU;
``--tiny`` picks shapes a CPU runs in seconds (fp32), where the Triton columns run only under
``TRITON_INTERPRET=1`` (a check of their wiring; interpreter times mean nothing). Prints a table, writes
``bench_expert_block.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from granular_moe.dispatch import expert_order  # noqa: E402
from granular_moe.ops import kernels_for  # noqa: E402
from provenance import provenance  # noqa: E402

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
# TRITON_INTERPRET=1 on a CPU: the Triton columns (ours, ScatterMoE) run under Triton's interpreter
INTERPRETED = not ON_CUDA and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEFAULT_SHAPES = dict(tokens=16384, d_model=2048, d_ff=8192, experts=8, topk=1, gs="1,4,16,64")
TINY_SHAPES = dict(tokens=64, d_model=32, d_ff=128, experts=4, topk=1, gs="1,2,4")
IMPLS = ("dense", "loop", "grouped_mm", "ours_torch", "ours_triton", "scattermoe")
# Largest output deviation from ours_torch (relative to its largest entry) for a column to count as the
# same work: the rounding of 16-bit activations and weights, or of TF32 dots in fp32
SAME_WORK_TOLERANCE = {torch.bfloat16: 5e-2, torch.float16: 1e-2, torch.float32: 1e-3}


def measure_ms(fn, cpu_reps: int = 3) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on a GPU, ``cpu_reps`` runs on a CPU."""
    if ON_CUDA:
        import triton.testing

        torch.cuda.synchronize()
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()
    times = []
    for _ in range(cpu_reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_memory_mib(fn):
    """Peak memory ``fn()`` allocates above what is allocated before it, in MiB (None on a CPU)."""
    if not ON_CUDA:
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")


def routing(tokens: int, num_experts: int, topk: int, generator: torch.Generator):
    """Softmax top-k routing of random logits: ``(expert_index [T, k] ascending per token, gates [T, k])``."""
    probs = torch.randn(tokens, num_experts, generator=generator).to(DEVICE).softmax(-1)
    gates, index = probs.topk(topk, dim=-1)
    index, order = index.sort(dim=-1)
    gates = gates.gather(-1, order)
    return index, gates / gates.sum(-1, keepdim=True)


def activate(h: torch.Tensor, gated: bool) -> torch.Tensor:
    if gated:
        a, gate = h.chunk(2, dim=-1)
        return F.silu(a) * gate
    return F.gelu(h)


def make_step(name: str, args, granularity: int, dtype: torch.dtype):
    """``(step, forward)`` of ``name`` at granularity G: forward + backward, and the forward's output alone
    (for the equal-work check); None where the column does not run."""
    generator = torch.Generator().manual_seed(granularity)
    tokens, d, num_experts, topk = args.tokens, args.d_model, args.experts * granularity, args.topk * granularity
    expert_hidden = args.d_ff // granularity
    width = 2 if args.gated else 1
    index, gates = routing(tokens, num_experts, topk, generator)
    gates = gates.to(dtype)
    x = torch.randn(tokens, d, generator=generator).to(DEVICE, dtype).requires_grad_()
    grad = torch.randn(tokens, d, generator=generator).to(DEVICE, dtype)

    def weights(*shape, fan_in):
        return (torch.randn(*shape, generator=generator) * fan_in**-0.5).to(DEVICE, dtype).requires_grad_()

    if name == "dense":
        w1 = weights(d, args.topk * args.d_ff * width, fan_in=d)
        w2 = weights(args.topk * args.d_ff, d, fan_in=args.d_ff)

        def dense_forward():
            return activate(x @ w1, args.gated) @ w2

        return lambda: dense_forward().backward(grad), dense_forward

    w1 = weights(num_experts, d, expert_hidden * width, fan_in=d)
    w2 = weights(num_experts, expert_hidden, d, fan_in=expert_hidden)
    flat = index.reshape(-1)
    token_offsets = torch.arange(0, tokens * topk + 1, topk, device=DEVICE)

    if name in ("loop", "grouped_mm"):
        if name == "loop" and num_experts > args.loop_max_experts:
            return None
        if name == "grouped_mm" and not (ON_CUDA and hasattr(torch, "_grouped_mm")):
            return None
        order = flat.argsort(stable=True)
        token_of_row = order // topk
        gate_of_row = gates.reshape(-1)[order].unsqueeze(1)
        counts = torch.bincount(flat, minlength=num_experts)
        ends = counts.cumsum(0).to(torch.int32)
        split = counts.tolist()

        def sorted_forward():
            rows = x[token_of_row]
            if name == "loop":
                out = torch.cat([activate(r @ w1[e], args.gated) @ w2[e] for e, r in enumerate(rows.split(split))])
            else:
                out = torch._grouped_mm(activate(torch._grouped_mm(rows, w1, offs=ends), args.gated), w2, offs=ends)
            return torch.zeros_like(x).index_add(0, token_of_row, out * gate_of_row)

        return lambda: sorted_forward().backward(grad), sorted_forward

    if name in ("ours_torch", "ours_triton"):
        if name == "ours_triton" and not (ON_CUDA or INTERPRETED):
            return None
        ops = kernels_for(name.removeprefix("ours_"), DEVICE)
        activation = F.silu if args.gated else F.gelu
        weight = gates.reshape(-1)

        def ours_forward():  # as the layer runs it: gates scale the activations, the combine sums
            plan = ops.dispatch_plan(flat, token_offsets, num_experts)
            probs = expert_order(weight, plan.row_of_assignment)
            rows = ops.grouped_mlp(x, plan.tokens_per_expert, w1, w2, activation, args.gated, plan.source_token,
                                   probs)
            return ops.combine(rows, None, plan.row_of_assignment, token_offsets)

        return lambda: ours_forward().backward(grad), ours_forward

    if name == "scattermoe":
        if not ((ON_CUDA or INTERPRETED) and args.scattermoe_path):
            return None
        sys.path.insert(0, args.scattermoe_path)
        from scattermoe.mlp import MLP, GLUMLP

        if args.gated:  # ScatterMoE's GLU: [linear | activated] halves; ours: [activated | linear]
            mlp = GLUMLP(input_size=d, hidden_size=expert_hidden, num_experts=num_experts, top_k=topk,
                         activation=torch.nn.SiLU())
            fc1 = torch.cat([w1[..., expert_hidden:], w1[..., :expert_hidden]], dim=-1)
        else:
            mlp = MLP(input_size=d, hidden_size=expert_hidden, num_experts=num_experts, top_k=topk,
                      activation=torch.nn.GELU())
            fc1 = w1
        mlp = mlp.to(DEVICE, dtype)
        with torch.no_grad():  # the same experts as every other column ([E, out, in] there)
            mlp.experts.weight.copy_(fc1.transpose(1, 2))
            mlp.output_experts.weight.copy_(w2.transpose(1, 2))

        def scattermoe_forward():
            return mlp(x, gates, index)

        return lambda: scattermoe_forward().backward(grad), scattermoe_forward
    raise ValueError(name)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest deviation relative to the largest entry (NaN when either holds a NaN or the shapes differ)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape or actual.isnan().any() or expected.isnan().any():
        return float("nan")
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)) if expected.numel() else 0.0


def add_shape_arguments(parser: argparse.ArgumentParser, d_ff: bool = True) -> None:
    """The expert-block shape flags the kernel benchmarks share; unset ones take the README's shapes, or the
    small ones with ``--tiny`` (:func:`fill_shape_defaults`)."""
    parser.add_argument("--tiny", action="store_true", help="small shapes a CPU runs in seconds")
    parser.add_argument("--tokens", type=int)
    parser.add_argument("--d-model", type=int)
    if d_ff:
        parser.add_argument("--d-ff", type=int)
    parser.add_argument("--experts", type=int, help="experts before granularity (E)")
    parser.add_argument("--topk", type=int, help="top-k before granularity")
    parser.add_argument("--gs", help="granularities, comma separated")


def fill_shape_defaults(args: argparse.Namespace, default_shapes: dict, tiny_shapes: dict) -> None:
    for key, value in (tiny_shapes if args.tiny else default_shapes).items():
        if getattr(args, key, value) is None:
            setattr(args, key, value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.add_argument("--gated", action="store_true", help="SwiGLU experts instead of GELU")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--loop-max-experts", type=int, default=128)
    parser.add_argument(
        "--scattermoe-path", help="folder holding the scattermoe package (a local copy, never committed)"
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_expert_block.json")
    args = parser.parse_args(argv)
    fill_shape_defaults(args, DEFAULT_SHAPES, TINY_SHAPES)
    dtype = torch.bfloat16 if ON_CUDA else torch.float32
    flops = 3 * 2 * args.tokens * args.topk * args.d_model * args.d_ff * (3 if args.gated else 2)
    info = provenance() | {
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": args.tokens, "d_model": args.d_model, "d_ff": args.d_ff, "experts": args.experts,
        "topk": args.topk, "gated": args.gated, "flops_per_step": flops,
    }
    print(json.dumps(info))
    impls = args.impls.split(",")
    tolerance = SAME_WORK_TOLERANCE[dtype]
    rows = []
    for granularity in (int(g) for g in args.gs.split(",")):
        expected = None
        for name in impls:
            row = {"G": granularity, "impl": name}
            try:
                column = make_step(name, args, granularity, dtype)
                if column is None:
                    continue
                step, forward = column
                if name != "dense":  # the same function of the same inputs, or no timing
                    with torch.no_grad():
                        if expected is None:
                            expected = make_step("ours_torch", args, granularity, dtype)[1]()
                        row["difference"] = significant(relative_error(forward(), expected), 3)
                    if not row["difference"] <= tolerance:
                        raise ValueError(f"output differs from ours_torch's by {row['difference']} "
                                         f"(tolerance {tolerance:g}): not the same work")
                ms = measure_ms(step)
                tflops = flops / (ms * 1e-3) / 1e12
                row.update(ms=significant(ms), TFLOPs=significant(tflops), peak_MiB=peak_memory_mib(step))
            except Exception as error:  # one failing column must not hide the others
                row["error"] = repr(error)[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if ON_CUDA:
                torch.cuda.empty_cache()
    write_json(Path(args.out) / "bench_expert_block.json", {"info": info, "rows": rows})
    print_table(rows, impls)
    return 1 if any("error" in row for row in rows) else 0


def print_table(rows, impls):
    """ms (x dense), TFLOP/s and peak MiB per G and implementation."""
    present = [i for i in impls if any(r["impl"] == i for r in rows)]
    print("\n| G | " + " | ".join(present) + " |")
    print("|---|" + "---|" * len(present))
    for granularity in sorted({r["G"] for r in rows}):
        by_impl = {r["impl"]: r for r in rows if r["G"] == granularity}
        dense = by_impl.get("dense", {}).get("ms")
        cells = []
        for name in present:
            r = by_impl.get(name)
            if r is None:
                cells.append("-")
            elif "ms" not in r:
                cells.append("error")
            else:
                ratio = f" ({r['ms'] / dense:.2f}x)" if dense else ""
                memory = "n/a" if r["peak_MiB"] is None else f"{r['peak_MiB']:.0f} MiB"
                cells.append(f"{r['ms']:.4g} ms{ratio}, {r['TFLOPs']:.3g} TFLOP/s, {memory}")
        print(f"| {granularity} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
