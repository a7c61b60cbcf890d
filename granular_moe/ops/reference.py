"""Plain PyTorch versions of the layer's kernels: the CPU path, and the reference every fast path is
tested against. Signatures are the kernels' own."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from granular_moe.ops.plan import DispatchPlan, ExpertParallelPlan


def dispatch_plan(expert_index: torch.Tensor, token_offsets: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Routing metadata: per-expert counts and a stable sort of the assignments by expert."""
    num_assignments = expert_index.numel()
    tokens = torch.arange(token_offsets.numel() - 1, device=expert_index.device)
    token_of_assignment = torch.repeat_interleave(tokens, token_offsets.diff(), output_size=num_assignments)
    order = torch.argsort(expert_index, stable=True)
    row_of_assignment = torch.empty_like(order)
    row_of_assignment[order] = torch.arange(num_assignments, device=order.device)
    return DispatchPlan(
        source_token=token_of_assignment[order],
        row_of_assignment=row_of_assignment,
        tokens_per_expert=torch.bincount(expert_index, minlength=num_experts),
    )


def expert_parallel_plan(
    expert_index: torch.Tensor, token_offsets: torch.Tensor, num_local_experts: int, ep_size: int
) -> ExpertParallelPlan:
    """Destination ranks of the assignments (rank ``r`` owns experts ``[r L, (r + 1) L)``), de-duplicated
    to one row per (token, rank)."""
    device, num_assignments = expert_index.device, expert_index.numel()
    num_tokens = token_offsets.numel() - 1
    tokens = torch.repeat_interleave(
        torch.arange(num_tokens, device=device), token_offsets.diff(), output_size=num_assignments
    )
    destination = expert_index // num_local_experts
    # Assignments are grouped by token with experts ascending, so each (token, rank) pair is a run.
    starts_pair = torch.ones(num_assignments, dtype=torch.bool, device=device)
    starts_pair[1:] = (tokens[1:] != tokens[:-1]) | (destination[1:] != destination[:-1])
    pair_first = starts_pair.nonzero().squeeze(1)
    pair_token, pair_rank = tokens[pair_first], destination[pair_first]
    pair_size = torch.diff(pair_first, append=pair_first.new_tensor([num_assignments]))
    send_pairs = torch.argsort(pair_rank, stable=True)
    sent_row_of_pair = torch.empty_like(send_pairs)
    sent_row_of_pair[send_pairs] = torch.arange(send_pairs.numel(), device=device)
    pairs_per_token = torch.bincount(pair_token, minlength=num_tokens)
    return ExpertParallelPlan(
        send_token=pair_token[send_pairs],
        send_row_size=pair_size[send_pairs],
        send_assignments=torch.argsort(destination, stable=True),
        rows_per_rank=torch.bincount(pair_rank, minlength=ep_size),
        assignments_per_rank=torch.bincount(destination, minlength=ep_size),
        pair_offsets=torch.nn.functional.pad(torch.cumsum(pairs_per_token, 0), (1, 0)),
        sent_row_of_pair=sent_row_of_pair,
    )


def expert_activation(h: torch.Tensor, activation: Callable, gated: bool) -> torch.Tensor:
    """``act(h)``, or ``act(h[:, :n]) * h[:, n:]`` for gated linear units (Megatron's GLU layout)."""
    if gated:
        a, gate = h.chunk(2, dim=-1)
        return activation(a) * gate
    return activation(h)


def grouped_mlp(
    x: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    weight1: torch.Tensor,
    weight2: torch.Tensor,
    activation: Callable,
    gated: bool,
    gather_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Expert MLPs over expert-sorted rows: ``act(x_e @ weight1[e]) @ weight2[e]`` for each local expert.

    With ``gather_index`` the rows are ``x[gather_index]`` (the permute, fused into the kernels' loads).
    """
    if gather_index is not None:
        x = x.index_select(0, gather_index)
    outputs = [
        expert_activation(rows @ weight1[e], activation, gated) @ weight2[e]
        for e, rows in enumerate(x.split(tokens_per_expert.tolist()))
    ]
    return torch.cat(outputs)


def combine(
    expert_output: torch.Tensor,
    weight: torch.Tensor,
    row_of_assignment: torch.Tensor,
    token_offsets: torch.Tensor,
) -> torch.Tensor:
    """``out[t] = sum_a weight[a] * expert_output[row_of_assignment[a]]`` over token t's assignments.

    Accumulates in the wider of the two dtypes and returns ``expert_output``'s dtype.
    """
    acc_dtype = torch.promote_types(expert_output.dtype, weight.dtype)
    rows = expert_output.index_select(0, row_of_assignment).to(acc_dtype) * weight.to(acc_dtype).unsqueeze(-1)
    return torch.segment_reduce(rows, "sum", offsets=token_offsets, axis=0).to(expert_output.dtype)


def permute(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``x[index]``, e.g. tokens into expert order or into expert-parallel send buffers."""
    return x.index_select(0, index)
