"""All-to-all bytes per token of the expert-parallel dispatch: flat vs two-level, with and without a node limit,
and without de-duplication (Megatron's all-to-all dispatcher).

For each granularity G and number of nodes (``--gpus-per-node`` ranks each; EP = nodes x GPUs), routes T tokens
through the fine-grained router (E*G experts, top-k*G; a random router, so routing is close to uniform, as
a trained one with balancing aims to be) and builds, for source rank 0 (node 0, local rank 0), the plans the
dispatchers run (``granular_moe.ops.reference.expert_parallel_plan``):

- **flat** (one level over the whole expert-parallel group): one row per (token, destination rank), so a
  token crosses the network once per remote rank it visits;
- **two-level** (:func:`granular_moe.dispatch.build_dispatcher` when the group spans nodes): one row per
  (token, destination node) to the rank of the same local index there, which forwards it inside its node to
  the ranks holding its experts, once per rank (the rows node ``m``'s peer forwards for this rank's tokens
  are counted as this rank's intra-node traffic);
- **two-level, node-limited**: the same with megatron-core's group-limited top-k, ``--moe-router-num-groups``
  = nodes and ``--moe-router-group-topk M`` (DeepSeek-V3's 4), so a token visits at most M nodes;
- **no de-duplication**: one row per remote (token, expert) assignment, as Megatron's all-to-all dispatcher.

Bytes: a row is d_model activations plus an int64 size; an assignment an int64 expert id and an fp32 gate.
The combine returns the same rows. Prints a table and writes ``alltoall_bytes.json``::

    python benchmarks/bench_alltoall_bytes.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from granular_moe.ops.reference import expert_parallel_plan
from granular_moe.scores import group_limited_topk
from provenance import provenance

BYTES_INT64, BYTES_GATE = 8, 4


def route(tokens: int, d_model: int, num_experts: int, topk: int, generator: torch.Generator,
          num_groups: int | None = None, group_topk: int | None = None):
    """Token-major top-k routing of a random router (expert ids ascending within a token), group-limited when
    ``group_topk`` is given: ``(expert_index [T k], token_offsets [T + 1])``."""
    x = torch.randn(tokens, d_model, generator=generator)
    router = torch.randn(num_experts, d_model, generator=generator) * d_model**-0.5
    scores = torch.softmax(x @ router.t(), dim=-1)
    if group_topk:
        experts = group_limited_topk(scores, topk, num_groups, group_topk)[1]
    else:
        experts = scores.topk(topk, dim=-1).indices
    return experts.sort(dim=-1).values.reshape(-1), torch.arange(tokens + 1) * topk


def subset(expert_index: torch.Tensor, token_offsets: torch.Tensor, keep: torch.Tensor):
    """The routing restricted to the assignments ``keep`` marks, tokens without any dropped."""
    tokens = torch.repeat_interleave(torch.arange(token_offsets.numel() - 1), token_offsets.diff())
    counts = torch.bincount(tokens[keep], minlength=token_offsets.numel() - 1)
    counts = counts[counts > 0]
    return expert_index[keep], torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))


def level_bytes(rows: int, assignments: int, row_bytes: int) -> int:
    return rows * (row_bytes + BYTES_INT64) + assignments * (BYTES_INT64 + BYTES_GATE)


def two_level(expert_index, token_offsets, experts_per_rank: int, nodes: int, gpus: int, row_bytes: int) -> dict:
    """Source rank 0's rows and bytes to other nodes (level 1) and, inside every destination node, the rows
    the receiving peer (local rank 0) forwards to its node's other ranks (level 2)."""
    per_node = experts_per_rank * gpus
    level1 = expert_parallel_plan(expert_index, token_offsets, per_node, nodes)
    inter_rows, inter_assignments = int(level1.rows_per_rank[1:].sum()), int(level1.assignments_per_rank[1:].sum())
    intra_rows = intra_assignments = 0
    node_of = expert_index // per_node
    for node in range(nodes):
        keep = node_of == node
        if not bool(keep.any()):
            continue
        local_index, local_offsets = subset(expert_index, token_offsets, keep)
        level2 = expert_parallel_plan(local_index % per_node, local_offsets, experts_per_rank, gpus)
        intra_rows += int(level2.rows_per_rank[1:].sum())
        intra_assignments += int(level2.assignments_per_rank[1:].sum())
    return {"inter_rows": inter_rows, "inter_bytes": level_bytes(inter_rows, inter_assignments, row_bytes),
            "intra_rows": intra_rows, "intra_bytes": level_bytes(intra_rows, intra_assignments, row_bytes)}


def measure(tokens, d_model, element_bytes, base_experts, base_topk, granularity, nodes, gpus, node_limit, seed):
    num_experts, topk, ep = base_experts * granularity, base_topk * granularity, nodes * gpus
    experts_per_rank, row_bytes = num_experts // ep, d_model * element_bytes
    expert_index, offsets = route(tokens, d_model, num_experts, topk, torch.Generator().manual_seed(seed))

    flat = expert_parallel_plan(expert_index, offsets, experts_per_rank, ep)
    node_of_rank = torch.arange(ep) // gpus
    remote, other_node = torch.arange(ep) != 0, node_of_rank != 0
    same_node = remote & ~other_node
    flat_inter_rows = int(flat.rows_per_rank[other_node].sum())
    flat_intra_rows = int(flat.rows_per_rank[same_node].sum())
    remote_assignments = int(flat.assignments_per_rank[remote].sum())
    visited = torch.zeros(tokens, nodes, dtype=torch.bool)
    token_of = torch.repeat_interleave(torch.arange(tokens), offsets.diff())
    visited[token_of, expert_index // (num_experts // nodes)] = True
    row = {
        "G": granularity, "nodes": nodes, "EP": ep, "experts": num_experts, "topk": topk,
        "nodes_per_token": visited.sum(dim=1).double().mean().item(),
        "flat_inter_rows_per_token": flat_inter_rows / tokens,
        "flat_inter_bytes_per_token": level_bytes(
            flat_inter_rows, int(flat.assignments_per_rank[other_node].sum()), row_bytes) / tokens,
        "flat_intra_bytes_per_token": level_bytes(
            flat_intra_rows, int(flat.assignments_per_rank[same_node].sum()), row_bytes) / tokens,
        "undeduplicated_inter_bytes_per_token":
            int(flat.assignments_per_rank[other_node].sum()) * (row_bytes + BYTES_GATE) / tokens,
        "undeduplicated_bytes_per_token": remote_assignments * (row_bytes + BYTES_GATE) / tokens,
    }
    levels = two_level(expert_index, offsets, experts_per_rank, nodes, gpus, row_bytes)
    row |= {f"two_level_{key}_per_token": value / tokens for key, value in levels.items()}
    if node_limit and nodes > node_limit and topk % node_limit == 0:
        limited_index, limited_offsets = route(tokens, d_model, num_experts, topk, torch.Generator().manual_seed(seed),
                                               num_groups=nodes, group_topk=node_limit)
        limited = two_level(limited_index, limited_offsets, experts_per_rank, nodes, gpus, row_bytes)
        row |= {f"node_limited_{key}_per_token": value / tokens for key, value in limited.items()}
    return row


def kib(value) -> str:
    return "-" if value is None else f"{value / 1024:.2f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--element-bytes", type=int, default=2, help="bytes per activation element (2: bf16)")
    parser.add_argument("--num-experts", type=int, default=16, help="base experts E")
    parser.add_argument("--topk", type=int, default=1, help="base top-k")
    parser.add_argument("--granularities", default="1,4,16,64")
    parser.add_argument("--nodes", default="1,2,4,8,16,32")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--node-limit", type=int, default=4, help="M of the node-limited rows (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    rows = []
    for granularity in map(int, args.granularities.split(",")):
        for nodes in map(int, args.nodes.split(",")):
            if (args.num_experts * granularity) % (nodes * args.gpus_per_node):
                continue  # fewer experts than ranks, or not divisible
            rows.append(measure(args.tokens, args.d_model, args.element_bytes, args.num_experts, args.topk,
                                granularity, nodes, args.gpus_per_node, args.node_limit, args.seed))
    print(f"all-to-all dispatch from one rank, KiB per token (d_model {args.d_model}, {args.element_bytes}-byte "
          f"activations, E={args.num_experts} top-{args.topk} before G, {args.gpus_per_node} GPUs per node, "
          f"node limit M={args.node_limit})")
    print("| G | nodes x GPUs (EP) | experts, top-k | nodes/token | inter-node: no de-dup | flat | two-level | "
          f"two-level, M={args.node_limit} | inter-node rows/token: flat | two-level | intra-node: flat | two-level |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['G']} | {r['nodes']} x {args.gpus_per_node} ({r['EP']}) | {r['experts']}, {r['topk']} | "
              f"{r['nodes_per_token']:.2f} | {kib(r['undeduplicated_inter_bytes_per_token'])} | "
              f"{kib(r['flat_inter_bytes_per_token'])} | {kib(r['two_level_inter_bytes_per_token'])} | "
              f"{kib(r.get('node_limited_inter_bytes_per_token'))} | {r['flat_inter_rows_per_token']:.2f} | "
              f"{r['two_level_inter_rows_per_token']:.2f} | {kib(r['flat_intra_bytes_per_token'])} | "
              f"{kib(r['two_level_intra_bytes_per_token'])} |")
    args.out.mkdir(parents=True, exist_ok=True)
    info = provenance() | vars(args) | {"out": str(args.out)}
    (args.out / "alltoall_bytes.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
