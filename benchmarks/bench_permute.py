"""Bandwidth of the token shuffle per granularity G: routing metadata, permute and combine, against a copy.

Same routing as ``bench_expert_block.py`` (T tokens of width d, top-(k*G) of E*G experts, A = T*k*G
assignments). Bytes are the logical bytes of the operation, the same for every backend: each element it
must read or write counted once, indices and gates included:

* ``copy``: ``dst.copy_(src)`` of the ``[A, d]`` expert rows, 2 * A * d elements: the ceiling.
* ``permute``: ``x[source_token]``, reads and writes ``[A, d]``.
* ``combine``: ``out[t] = sum_a gate[a] * rows[row_of_assignment[a]]``, reads ``[A, d]``, writes ``[T, d]``.
* ``dispatch_plan``: reads the A expert ids, writes three int64 arrays of A.

Columns: ``torch`` (the references of ``--moe-kernels torch``), ``index_add`` (combine as the
``index_add`` the anchors measured), ``triton`` (``--moe-kernels triton``, CUDA only). Reports ms, GB/s and
% of the copy's GB/s. Defaults are the README's shapes on a GPU (bf16); ``--tiny`` runs in seconds on a
CPU (fp32). Prints a table, writes ``bench_permute.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from bench_expert_block import (
    DEVICE, DEFAULT_SHAPES, ON_CUDA, TINY_SHAPES, add_shape_arguments, fill_shape_defaults, measure_ms, routing,
    significant, write_json,
)
from granular_moe.ops import kernels_for
from provenance import provenance

BACKENDS = ("torch", "index_add", "triton")


def make_op(op: str, backend: str, tokens: int, d: int, num_experts: int, topk: int, dtype: torch.dtype, generator):
    """``(closure, bytes moved)`` for ``op`` on ``backend``, or None where it does not run."""
    if backend == "triton" and not ON_CUDA:
        return None
    if backend == "index_add" and op != "combine":
        return None
    index, gates = routing(tokens, num_experts, topk, generator)
    expert_index, gates = index.reshape(-1), gates.reshape(-1).to(dtype)
    token_offsets = torch.arange(0, tokens * topk + 1, topk, device=DEVICE)
    num_rows = expert_index.numel()
    element = torch.finfo(dtype).bits // 8
    ops = kernels_for("torch" if backend == "index_add" else backend, DEVICE)
    plan = ops.dispatch_plan(expert_index, token_offsets, num_experts)
    rows = torch.randn(num_rows, d, generator=generator).to(DEVICE, dtype)
    if op == "copy":
        destination = torch.empty_like(rows)
        return (lambda: destination.copy_(rows)), 2 * rows.numel() * element
    if op == "dispatch_plan":
        return (lambda: ops.dispatch_plan(expert_index, token_offsets, num_experts)), num_rows * (8 + 3 * 8)
    if op == "permute":
        x = torch.randn(tokens, d, generator=generator).to(DEVICE, dtype)
        return (lambda: ops.permute(x, plan.source_token)), 2 * num_rows * d * element + num_rows * 8
    if op == "combine":
        moved = (num_rows + tokens) * d * element + num_rows * (element + 8)
        if backend == "index_add":
            gate_of_row = gates[torch.argsort(plan.row_of_assignment)].unsqueeze(1)

            def index_add():
                out = torch.zeros(tokens, d, device=DEVICE, dtype=dtype)
                return out.index_add_(0, plan.source_token, rows * gate_of_row)

            return index_add, moved
        return (lambda: ops.combine(rows, gates, plan.row_of_assignment, token_offsets)), moved
    raise ValueError(op)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser, d_ff=False)
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_permute.json")
    args = parser.parse_args(argv)
    fill_shape_defaults(args, DEFAULT_SHAPES, TINY_SHAPES)
    dtype = torch.bfloat16 if ON_CUDA else torch.float32
    info = provenance() | {
        "dtype": str(dtype).removeprefix("torch."), "tokens": args.tokens, "d_model": args.d_model,
        "experts": args.experts, "topk": args.topk,
    }
    print(json.dumps(info))
    rows = []
    for granularity in (int(g) for g in args.gs.split(",")):
        copy_gbps = None
        for op in ("copy", "dispatch_plan", "permute", "combine"):
            for backend in ("torch",) if op == "copy" else BACKENDS:
                generator = torch.Generator().manual_seed(granularity)
                row = {"G": granularity, "op": op, "backend": backend}
                try:
                    made = make_op(op, backend, args.tokens, args.d_model, args.experts * granularity,
                                   args.topk * granularity, dtype, generator)
                    if made is None:
                        continue
                    fn, moved = made
                    ms = measure_ms(fn)
                    gbps = moved / (ms * 1e-3) / 1e9
                    copy_gbps = gbps if op == "copy" else copy_gbps
                    row.update(ms=significant(ms), GBps=significant(gbps), copy_share=significant(gbps / copy_gbps))
                except Exception as error:  # one failing column must not hide the others
                    row["error"] = repr(error)[:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
    write_json(Path(args.out) / "bench_permute.json", {"info": info, "rows": rows})
    print("\n| G | op | " + " | ".join(BACKENDS) + " |")
    print("|---|---|" + "---|" * len(BACKENDS))
    for granularity in sorted({r["G"] for r in rows}):
        for op in ("copy", "dispatch_plan", "permute", "combine"):
            cells = []
            for backend in BACKENDS:
                r = next((r for r in rows if (r["G"], r["op"], r["backend"]) == (granularity, op, backend)), None)
                if r is None:
                    cells.append("-")
                elif "ms" not in r:
                    cells.append("error")
                else:
                    cells.append(f"{r['ms']:.4g} ms, {r['GBps']:.4g} GB/s ({100 * r['copy_share']:.0f}% of copy)")
            print(f"| {granularity} | {op} | " + " | ".join(cells) + " |")
    return rows


if __name__ == "__main__":
    main()
