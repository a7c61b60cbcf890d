"""All-to-all bytes per token of the expert-parallel dispatch, with and without de-duplication.

For each granularity G and expert-parallel size EP, routes T tokens of width d_model through the
fine-grained router (E*G experts, top-k*G; a random router, so routing is close to uniform, as a trained
one with the load-balancing loss aims to be), builds the dispatcher's plan for each simulated source rank
(``granular_moe.ops.reference.expert_parallel_plan``, the code the dispatcher runs) and counts what one
dispatch sends to other ranks:

- de-duplicated (this plugin): one row of d_model per (token, remote rank), plus per row an int64 size
  and per assignment an int64 expert id and an fp32 gate weight;
- not de-duplicated (Megatron's alltoall dispatcher): one row per (token, remote expert), plus its gate.

The combine sends the same rows back. A source rank sends to ``EP - 1`` remote ranks of EP. Prints a
table and writes JSON. Example: ``python benchmarks/bench_alltoall_bytes.py --out results``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from granular_moe.ops.reference import expert_parallel_plan
from provenance import provenance

BYTES_INT64, BYTES_GATE = 8, 4


def route(tokens: int, d_model: int, num_experts: int, topk: int, generator: torch.Generator):
    """Token-major (expert ids ascending within a token) top-k routing of a random router."""
    x = torch.randn(tokens, d_model, generator=generator)
    router = torch.randn(num_experts, d_model, generator=generator) * d_model**-0.5
    experts = (x @ router.t()).topk(topk, dim=-1).indices.sort(dim=-1).values
    return experts.reshape(-1), torch.arange(tokens + 1) * topk


def measure(tokens, d_model, element_bytes, base_experts, base_topk, granularity, ep, seed):
    num_experts, topk = base_experts * granularity, base_topk * granularity
    expert_index, offsets = route(tokens, d_model, num_experts, topk, torch.Generator().manual_seed(seed))
    plan = expert_parallel_plan(expert_index, offsets, num_experts // ep, ep)
    row_bytes = d_model * element_bytes
    # Simulated source rank 0: what it sends to ranks 1..EP-1.
    remote_rows = int(plan.rows_per_rank[1:].sum())
    remote_assignments = int(plan.assignments_per_rank[1:].sum())
    deduplicated = remote_rows * (row_bytes + BYTES_INT64) + remote_assignments * (BYTES_INT64 + BYTES_GATE)
    undeduplicated = remote_assignments * (row_bytes + BYTES_GATE)
    return {
        "G": granularity, "EP": ep, "experts": num_experts, "topk": topk,
        "rows_per_token": plan.send_token.numel() / tokens,
        "remote_rows_per_token": remote_rows / tokens,
        "remote_assignments_per_token": remote_assignments / tokens,
        "bytes_per_token_deduplicated": deduplicated / tokens,
        "bytes_per_token_undeduplicated": undeduplicated / tokens,
        "saving": undeduplicated / deduplicated,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--element-bytes", type=int, default=2, help="bytes per activation element (2: bf16)")
    parser.add_argument("--num-experts", type=int, default=8, help="base experts E")
    parser.add_argument("--topk", type=int, default=1, help="base top-k")
    parser.add_argument("--granularities", default="1,4,16,64")
    parser.add_argument("--ep-sizes", default="2,4,8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    rows = [
        measure(args.tokens, args.d_model, args.element_bytes, args.num_experts, args.topk, g, ep, args.seed)
        for g in map(int, args.granularities.split(","))
        for ep in map(int, args.ep_sizes.split(","))
    ]
    print(f"all-to-all dispatch, bytes per token sent to other ranks (d_model {args.d_model}, "
          f"{args.element_bytes}-byte activations, E={args.num_experts} top-{args.topk} before G)")
    print(
        "| G | EP | experts | top-k | rows/token (all ranks) | KiB/token de-duplicated | KiB/token without | saving |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['G']} | {r['EP']} | {r['experts']} | {r['topk']} | {r['rows_per_token']:.2f} | "
              f"{r['bytes_per_token_deduplicated'] / 1024:.2f} | {r['bytes_per_token_undeduplicated'] / 1024:.2f} | "
              f"{r['saving']:.2f}x |")
    args.out.mkdir(parents=True, exist_ok=True)
    info = provenance() | vars(args) | {"out": str(args.out)}
    (args.out / "alltoall_bytes.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
