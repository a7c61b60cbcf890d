"""Plain PyTorch versions of the layer's kernels: the CPU path, and the reference every fast path is
tested against. Signatures are the kernels' own.

Memory kept for the backward follows the kernels' rule (see :func:`grouped_mlp`): per routed row only the first
GEMM's output and the row's gate; the expert inputs are the un-gathered ``x`` and no row of the model's width is
kept per assignment. The gates' gradient comes from the down projection's backward
(``d gate = <d(gate * act), act>``), not from the experts' output rows.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from granular_moe.ops.plan import DispatchPlan, ExpertParallelPlan, index_dtype


def dispatch_plan(expert_index: torch.Tensor, token_offsets: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Routing metadata: per-expert counts and a stable sort of the assignments by expert."""
    num_assignments, device = expert_index.numel(), expert_index.device
    dtype = index_dtype(max(num_assignments, token_offsets.numel()))
    tokens = torch.arange(token_offsets.numel() - 1, device=device, dtype=dtype)
    token_of_assignment = torch.repeat_interleave(tokens, token_offsets.diff(), output_size=num_assignments)
    order = torch.argsort(expert_index, stable=True)
    row_of_assignment = torch.empty(num_assignments, dtype=dtype, device=device)
    row_of_assignment[order] = torch.arange(num_assignments, dtype=dtype, device=device)
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


def gated_activation(act: torch.Tensor, probs: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """``probs * act`` per row (megatron-core's activation with probs: the product in the wider dtype, rounded to
    the experts' ``dtype``), or ``act`` without gates."""
    if probs is None:
        return act.to(dtype)
    return (act * probs.unsqueeze(-1)).to(dtype)


class GroupedMLP(torch.autograd.Function):
    """The reference expert block with the kernels' memory rule: saves ``x`` (not gathered), the first GEMM's
    output ``h`` and the gates; the backward recomputes ``act(h)`` and takes the gates' gradient from the down
    projection's input gradient."""

    @staticmethod
    def forward(ctx, x, weight1, weight2, probs, tokens_per_expert, gather_index, activation, gated):
        splits = tokens_per_expert.tolist()
        rows = x if gather_index is None else x.index_select(0, gather_index)
        h = torch.cat([part @ weight1[e] for e, part in enumerate(rows.split(splits))])
        del rows
        act = gated_activation(expert_activation(h, activation, gated), probs, x.dtype)
        out = torch.cat([part @ weight2[e] for e, part in enumerate(act.split(splits))])
        ctx.save_for_backward(x, weight1, weight2, probs, gather_index, h)
        ctx.splits, ctx.activation, ctx.gated = splits, activation, gated
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight1, weight2, probs, gather_index, h = ctx.saved_tensors
        needs_x, needs_w1, needs_w2, needs_probs = ctx.needs_input_grad[:4]
        splits = ctx.splits
        with torch.enable_grad():
            h = h.detach().requires_grad_()
            act = expert_activation(h, ctx.activation, ctx.gated)
        # d(probs * act) = grad_out_e @ weight2[e]^T: the down projection's input gradient.
        grad_scaled = torch.cat([part @ weight2[e].t() for e, part in enumerate(grad_out.split(splits))])
        grad_probs = None
        if probs is not None:
            if needs_probs:
                wide = torch.promote_types(act.dtype, probs.dtype)
                grad_probs = (grad_scaled.to(wide) * act.detach().to(wide)).sum(-1).to(probs.dtype)
            grad_act = gated_activation(grad_scaled, probs, h.dtype)
        else:
            grad_act = grad_scaled
        grad_w2 = None
        if needs_w2:
            scaled = gated_activation(act.detach(), probs, h.dtype)
            grad_w2 = torch.stack([
                part.t() @ grad for part, grad in zip(scaled.split(splits), grad_out.split(splits))
            ])
            del scaled
        (grad_h,) = torch.autograd.grad(act, h, grad_act)
        del act, grad_act, grad_scaled
        grad_w1 = grad_x = None
        if needs_w1:
            rows = x if gather_index is None else x.index_select(0, gather_index)
            grad_w1 = torch.stack([part.t() @ grad for part, grad in zip(rows.split(splits), grad_h.split(splits))])
            del rows
        if needs_x:
            grad_rows = torch.cat([part @ weight1[e].t() for e, part in enumerate(grad_h.split(splits))])
            if gather_index is None:
                grad_x = grad_rows
            else:
                grad_x = torch.zeros_like(x).index_add_(0, gather_index, grad_rows)
        return grad_x, grad_w1, grad_w2, grad_probs, None, None, None, None


def grouped_mlp(
    x: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    weight1: torch.Tensor,
    weight2: torch.Tensor,
    activation: Callable,
    gated: bool,
    gather_index: Optional[torch.Tensor] = None,
    probs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Expert MLPs over expert-sorted rows: ``(probs * act(x_e @ weight1[e])) @ weight2[e]`` for each local
    expert.

    With ``gather_index`` the rows are ``x[gather_index]`` (the permute, fused into the kernels' loads).
    ``probs [rows]``, each row's gate, scales the row's activation before the down projection, as megatron-core's
    experts apply their permuted probs; the rows then come out gated, and the gates' gradient is
    ``<d(probs * act), act>`` from the down projection's backward.

    Kept for the backward: ``x`` (un-gathered), ``h = x_e @ weight1[e]`` (the first GEMM's output) and
    ``probs``; ``act(h)`` is recomputed.
    """
    return GroupedMLP.apply(x, weight1, weight2, probs, tokens_per_expert, gather_index, activation, gated)


class _SumRows(torch.autograd.Function):
    """``out[t] = sum of expert_output[row_of_assignment[a]]`` over token t's assignments: keeps only the two
    index tensors (which the plan holds anyway); each row's gradient is its token's."""

    @staticmethod
    def forward(ctx, expert_output, row_of_assignment, token_offsets):
        ctx.save_for_backward(row_of_assignment, token_offsets)
        ctx.num_rows = expert_output.shape[0]
        acc_dtype = torch.float64 if expert_output.dtype == torch.float64 else torch.float32
        rows = expert_output.index_select(0, row_of_assignment).to(acc_dtype)
        out = rows.new_zeros(token_offsets.numel() - 1, expert_output.shape[1])
        token = _token_of_assignment(token_offsets, row_of_assignment.numel())
        return out.index_put_((token,), rows, accumulate=True).to(expert_output.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        row_of_assignment, token_offsets = ctx.saved_tensors
        grad_rows = grad_out.new_zeros(ctx.num_rows, grad_out.shape[1])
        grad_rows[row_of_assignment] = grad_out.index_select(0, _token_of_assignment(token_offsets,
                                                                                     row_of_assignment.numel()))
        return grad_rows, None, None


def _token_of_assignment(token_offsets: torch.Tensor, num_assignments: int) -> torch.Tensor:
    tokens = torch.arange(token_offsets.numel() - 1, device=token_offsets.device)
    return torch.repeat_interleave(tokens, token_offsets.diff(), output_size=num_assignments)


def combine(
    expert_output: torch.Tensor,
    weight: Optional[torch.Tensor],
    row_of_assignment: torch.Tensor,
    token_offsets: torch.Tensor,
) -> torch.Tensor:
    """``out[t] = sum_a weight[a] * expert_output[row_of_assignment[a]]`` over token t's assignments
    (``weight`` None: the plain sum, for rows :func:`grouped_mlp` has already gated).

    Accumulates in fp32 (fp64 for fp64 operands) and returns ``expert_output``'s dtype. The plain sum keeps nothing
    of the rows for the backward (each row's gradient is its token's); a weight that needs a gradient keeps them.
    """
    if weight is None:
        return _SumRows.apply(expert_output, row_of_assignment, token_offsets)
    acc_dtype = torch.promote_types(torch.promote_types(expert_output.dtype, weight.dtype), torch.float32)
    rows = expert_output.index_select(0, row_of_assignment).to(acc_dtype) * weight.to(acc_dtype).unsqueeze(-1)
    out = rows.new_zeros(token_offsets.numel() - 1, expert_output.shape[1])
    token = _token_of_assignment(token_offsets, row_of_assignment.numel())
    return out.index_put_((token,), rows, accumulate=True).to(expert_output.dtype)


def permute(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``x[index]``, e.g. tokens into expert order or into expert-parallel send buffers."""
    return x.index_select(0, index)
