"""Accuracy of the Triton kernels where they run: the whole expert block (routing metadata, grouped MLP
with the token gather fused in, combine), forward and backward, against the fp64 PyTorch reference.

Per case and dtype it reports the relative error (``max |ours - reference| / max |reference|``) of the
output and of the gradients for the tokens, both expert weights and the gates, and checks that the
routing metadata equals the reference's exactly. Targets: under 1e-2 in bf16 and fp16, under
1e-5 in fp32 (TF32 off), and a NaN in one token reaches that token's output only. Exit status 1 when a case
misses its target.

On a GPU the default cases span expert widths 32 to 8192, one token, top-64, empty experts and sizes
that are no multiple of a tile, in bf16, fp16 and fp32 (bf16 can only be checked there: Triton's CPU
interpreter mis-computes bf16). Without a GPU the kernels run under Triton's interpreter and ``--tiny``
cases are the ones it finishes in seconds (fp32, fp16).

    python benchmarks/kernel_accuracy.py --out benchmarks/results          # GPU: every case
    python benchmarks/kernel_accuracy.py --tiny --out /tmp/accuracy        # CPU, interpreter
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_expert_block import relative_error  # noqa: E402
from granular_moe.dispatch import expert_order  # noqa: E402
from granular_moe.ops import kernels_for, reference  # noqa: E402
from provenance import provenance  # noqa: E402

TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    d_model: int
    d_expert: int
    experts: int
    topk: int
    gated: bool = False
    empty_experts: int = 0  # the first this many experts get no token


GPU_CASES = [
    Case("d_expert_32_G64", 4096, 1024, 32, 512, 64),
    Case("d_expert_128_G16", 4096, 1024, 128, 128, 16, gated=True),
    Case("d_expert_1024_G1", 2048, 1024, 1024, 8, 1),
    Case("d_expert_8192", 1024, 512, 8192, 4, 1, gated=True),
    Case("one_token", 1, 256, 64, 16, 4),
    Case("odd_sizes_empty_experts", 777, 200, 96, 40, 5, empty_experts=10),
    Case("top64_odd", 300, 136, 48, 70, 64, gated=True),
]
TINY_CASES = [
    Case("tiny_gelu_empty_experts", 9, 24, 40, 6, 2, empty_experts=2),
    Case("tiny_swiglu_one_token", 1, 16, 32, 4, 3, gated=True),
]


def routing(case: Case, generator: torch.Generator, device):
    """Token-major assignments (distinct experts, ascending per token), their offsets and fp32 gates."""
    scores = torch.rand(case.tokens, case.experts, generator=generator)
    scores[:, : case.empty_experts] = -1.0
    expert_index = scores.topk(case.topk, dim=-1).indices.sort(dim=-1).values.reshape(-1)
    token_offsets = torch.arange(case.tokens + 1) * case.topk
    gates = torch.rand(expert_index.numel(), generator=generator)
    return expert_index.to(device), token_offsets.to(device), gates.to(device)


def expert_block(kernels, x, weight1, weight2, gates, expert_index, token_offsets, case: Case):
    """Routing metadata -> gathered grouped MLP with the gates scaling its activations -> plain-sum combine (as
    the layer runs it); the output, and the metadata."""
    plan = kernels.dispatch_plan(expert_index, token_offsets, case.experts)
    activation = F.silu if case.gated else F.gelu
    probs = expert_order(gates, plan.row_of_assignment)
    rows = kernels.grouped_mlp(x, plan.tokens_per_expert, weight1, weight2, activation, case.gated, plan.source_token,
                               probs)
    return kernels.combine(rows, None, plan.row_of_assignment, token_offsets), plan


def block_inputs(case: Case, generator: torch.Generator) -> list[torch.Tensor]:
    """``x [T, d]``, ``weight1 [E, d, d_expert (x2 gated)]``, ``weight2 [E, d_expert, d]`` in fp32 on the CPU."""
    width1 = case.d_expert * (2 if case.gated else 1)
    x = torch.randn(case.tokens, case.d_model, generator=generator)
    weight1 = torch.randn(case.experts, case.d_model, width1, generator=generator) * case.d_model**-0.5
    weight2 = torch.randn(case.experts, case.d_expert, case.d_model, generator=generator) * case.d_expert**-0.5
    return [x, weight1, weight2]


def check_case(case: Case, dtype: torch.dtype, device, seed: int = 0) -> dict:
    """Errors of one case in one dtype against the fp64 reference (inputs rounded to ``dtype`` first)."""
    generator = torch.Generator().manual_seed(seed)
    expert_index, token_offsets, gates = routing(case, generator, device)
    inputs = [t.to(device=device, dtype=dtype) for t in block_inputs(case, generator)]
    grad = torch.randn(case.tokens, case.d_model, generator=generator)

    def run(kernels, tensors, gate_weights, out_grad):
        leaves = [t.clone().requires_grad_() for t in (*tensors, gate_weights)]
        out, plan = expert_block(kernels, *leaves, expert_index, token_offsets, case)
        out.backward(out_grad.to(out.dtype))
        return out, plan, [leaf.grad for leaf in leaves]

    ours, plan, grads = run(kernels_for("triton", device), inputs, gates, grad.to(device))
    expected, expected_plan, expected_grads = run(
        reference, [t.double() for t in inputs], gates.double(), grad.to(device, torch.float64)
    )
    errors = {"output": relative_error(ours, expected)}
    errors.update({name: relative_error(got, want)
                   for name, got, want in zip(("grad_x", "grad_weight1", "grad_weight2", "grad_gates"),
                                              grads, expected_grads)})
    metadata_equal = all(torch.equal(getattr(plan, f), getattr(expected_plan, f))
                         for f in ("source_token", "row_of_assignment", "tokens_per_expert"))
    worst = max(errors.values(), key=lambda error: math.inf if math.isnan(error) else error)  # NaN is the worst
    passed = metadata_equal and worst < TOLERANCE[dtype]  # a NaN error compares False: fails
    return {"case": case.name, "dtype": str(dtype).removeprefix("torch."), **errors, "worst": worst,
            "tolerance": TOLERANCE[dtype], "metadata_equal": metadata_equal, "passed": passed}


def check_nan_isolation(case: Case, dtype: torch.dtype, device) -> dict:
    """A NaN in one token's input: that token's output is NaN, every other token's finite."""
    generator = torch.Generator().manual_seed(1)
    expert_index, token_offsets, gates = routing(case, generator, device)
    x, weight1, weight2 = block_inputs(case, generator)
    x[case.tokens // 2, 0] = float("nan")
    tensors = [t.to(device=device, dtype=dtype) for t in (x, weight1, weight2)]
    out, _ = expert_block(kernels_for("triton", device), *tensors, gates, expert_index, token_offsets, case)
    nan_rows = out.isnan().any(dim=-1).cpu()
    expected = torch.zeros(case.tokens, dtype=torch.bool)
    expected[case.tokens // 2] = True
    return {"case": f"nan_in_one_token({case.name})", "dtype": str(dtype).removeprefix("torch."),
            "passed": bool(torch.equal(nan_rows, expected))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small cases the CPU interpreter runs in seconds")
    parser.add_argument("--dtypes", default=None, help="comma-separated of bf16, fp16, fp32 "
                        "(default: all three on a GPU; fp32,fp16 on a CPU)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = (args.dtypes or ("bf16,fp16,fp32" if device.type == "cuda" else "fp32,fp16")).split(",")
    unknown = [name for name in names if name not in DTYPES]
    if unknown:
        parser.error(f"--dtypes {','.join(unknown)}: valid values are {', '.join(DTYPES)}")
    cases = TINY_CASES if args.tiny or device.type == "cpu" else GPU_CASES
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here (the kernels follow this switch)

    rows = []
    print("| case | dtype | output | grad x | grad weight1 | grad weight2 | grad gates | metadata | target | |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for case in cases:
        for name in names:
            row = check_case(case, DTYPES[name], device)
            rows.append({**row, "shape": asdict(case)})
            print(f"| {case.name} | {name} | " + " | ".join(f"{row[k]:.1e}" for k in
                  ("output", "grad_x", "grad_weight1", "grad_weight2", "grad_gates"))
                  + f" | {'equal' if row['metadata_equal'] else 'DIFFERS'} | < {row['tolerance']:.0e} | "
                  f"{'pass' if row['passed'] else 'FAIL'} |", flush=True)
    for name in names:
        row = check_nan_isolation(cases[0], DTYPES[name], device)
        rows.append(row)
        print(f"| {row['case']} | {name} | NaN only in that token: {'pass' if row['passed'] else 'FAIL'} |")

    args.out.mkdir(parents=True, exist_ok=True)
    info = provenance() | {"command": " ".join(["python", "benchmarks/kernel_accuracy.py", *(argv or sys.argv[1:])]),
                           "interpreted": os.environ.get("TRITON_INTERPRET") == "1"}
    (args.out / "kernel_accuracy.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    failed = [row["case"] + "/" + row["dtype"] for row in rows if not row["passed"]]
    if failed:
        print(f"kernel_accuracy: {len(failed)} failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
