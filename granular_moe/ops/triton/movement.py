"""Row movement in Triton: permute (gather rows), combine (each token's weighted sum of its rows) and the
segment sum both of their backward passes reduce with. No atomics anywhere: every output row is owned by
one program, which reads the rows it sums through an index (a CSR layout).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from granular_moe.ops.triton import tiles
from granular_moe.ops.triton.primitives import add


def accumulation_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """fp32, or fp64 when an operand is fp64."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _tl_dtype(dtype: torch.dtype):
    return {torch.float64: tl.float64, torch.float32: tl.float32}[dtype]


@triton.jit
def _gather_rows_kernel(
    x_ptr, index_ptr, out_ptr, num_rows, hidden, stride_x, stride_out,
    BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_mask = rows < num_rows
    mask = row_mask[:, None] & (cols < hidden)[None, :]
    source = tl.load(index_ptr + rows, mask=row_mask, other=0)
    values = tl.load(x_ptr + source[:, None] * stride_x + cols[None, :], mask=mask)
    tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], values, mask=mask)


@triton.jit
def _segment_sum_kernel(
    rows_ptr, row_index_ptr, weight_ptr, offsets_ptr, out_ptr, hidden, stride_rows, stride_out,
    HAS_WEIGHT: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """``out[s] = sum_{j in offsets[s]:offsets[s+1]} weight[j] * rows[row_index[j]]`` for one segment
    ``s`` (program 0) and ``BLOCK_H`` columns (program 1)."""
    segment = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    col_mask = cols < hidden
    start = tl.load(offsets_ptr + segment)
    end = tl.load(offsets_ptr + segment + 1)
    acc = tl.full([BLOCK_H], 0.0, ACC_DTYPE)
    for chunk in range(start, end, BLOCK_ROWS):
        entries = chunk + tl.arange(0, BLOCK_ROWS)
        entry_mask = entries < end
        source = tl.load(row_index_ptr + entries, mask=entry_mask, other=0)
        values = tl.load(
            rows_ptr + source[:, None] * stride_rows + cols[None, :],
            mask=entry_mask[:, None] & col_mask[None, :], other=0.0,
        ).to(ACC_DTYPE)
        if HAS_WEIGHT:
            weight = tl.load(weight_ptr + entries, mask=entry_mask, other=0.0).to(ACC_DTYPE)
            values = values * weight[:, None]
        acc += tl.reduce(values, 0, add)
    tl.store(out_ptr + segment * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _combine_backward_kernel(
    grad_out_ptr, expert_output_ptr, weight_ptr, row_of_assignment_ptr, offsets_ptr,
    grad_rows_ptr, grad_weight_ptr, hidden, stride_grad_out, stride_rows,  # rows: expert_output and grad_rows
    NEEDS_GRAD_ROWS: tl.constexpr, NEEDS_GRAD_WEIGHT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """For one token: ``grad_rows[row[a]] = weight[a] * grad_out[t]`` and
    ``grad_weight[a] = <grad_out[t], expert_output[row[a]]>`` over its assignments ``a``."""
    token = tl.program_id(0).to(tl.int64)
    start = tl.load(offsets_ptr + token)
    end = tl.load(offsets_ptr + token + 1)
    for chunk in range(start, end, BLOCK_ROWS):
        entries = chunk + tl.arange(0, BLOCK_ROWS)
        entry_mask = entries < end
        row = tl.load(row_of_assignment_ptr + entries, mask=entry_mask, other=0)
        weight = tl.load(weight_ptr + entries, mask=entry_mask, other=0.0).to(ACC_DTYPE)
        dot = tl.full([BLOCK_ROWS], 0.0, ACC_DTYPE)
        for col_start in range(0, hidden, BLOCK_H):
            cols = col_start + tl.arange(0, BLOCK_H)
            col_mask = cols < hidden
            mask = entry_mask[:, None] & col_mask[None, :]
            grad = tl.load(grad_out_ptr + token * stride_grad_out + cols, mask=col_mask, other=0.0).to(ACC_DTYPE)
            if NEEDS_GRAD_ROWS:
                grad_rows = weight[:, None] * grad[None, :]
                tl.store(
                    grad_rows_ptr + row[:, None] * stride_rows + cols[None, :],
                    grad_rows.to(grad_rows_ptr.dtype.element_ty), mask=mask,
                )
            if NEEDS_GRAD_WEIGHT:
                values = tl.load(expert_output_ptr + row[:, None] * stride_rows + cols[None, :], mask=mask, other=0.0)
                dot += tl.reduce(values.to(ACC_DTYPE) * grad[None, :], 1, add)
        if NEEDS_GRAD_WEIGHT:
            tl.store(grad_weight_ptr + entries, dot.to(grad_weight_ptr.dtype.element_ty), mask=entry_mask)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` for a 2-D ``x`` (no autograd)."""
    x = x.contiguous()
    out = torch.empty(index.numel(), x.shape[1], dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    t = tiles.movement_tiles(x.shape[1], rows_per_segment=16)
    grid = (triton.cdiv(index.numel(), t.block_rows), triton.cdiv(x.shape[1], t.block_h))
    _gather_rows_kernel[grid](
        x, index.contiguous(), out, index.numel(), x.shape[1], x.stride(0), out.stride(0),
        BLOCK_ROWS=t.block_rows, BLOCK_H=t.block_h, num_warps=t.num_warps,
    )
    return out


def segment_sum(
    rows: torch.Tensor,
    row_index: torch.Tensor,
    offsets: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``out[s] = sum_{j in offsets[s]:offsets[s+1]} weight[j] * rows[row_index[j]]`` (weight 1 if not
    given), accumulated in fp32 (fp64 for fp64 operands); empty segments give zeros."""
    rows = rows.contiguous()
    num_segments, hidden = offsets.numel() - 1, rows.shape[1]
    out = torch.empty(num_segments, hidden, dtype=out_dtype or rows.dtype, device=rows.device)
    if out.numel() == 0:
        return out
    acc_dtype = accumulation_dtype(rows.dtype, *(() if weight is None else (weight.dtype,)))
    t = tiles.movement_tiles(hidden, row_index.numel() / max(1, num_segments))
    _segment_sum_kernel[(num_segments, triton.cdiv(hidden, t.block_h))](
        rows, row_index.contiguous(), rows if weight is None else weight.contiguous(), offsets.contiguous(), out,
        hidden, rows.stride(0), out.stride(0),
        HAS_WEIGHT=weight is not None, ACC_DTYPE=_tl_dtype(acc_dtype),
        BLOCK_ROWS=t.block_rows, BLOCK_H=t.block_h, num_warps=t.num_warps,
    )
    return out


def inverse_index(index: torch.Tensor, num_targets: int):
    """The CSR transpose of ``index``: ``(order, offsets)`` with ``order[offsets[s]:offsets[s+1]]`` the
    positions ``j`` with ``index[j] == s``, ascending. Built with torch's stable sort."""
    order = torch.argsort(index, stable=True)
    offsets = torch.zeros(num_targets + 1, dtype=torch.int64, device=index.device)
    torch.cumsum(torch.bincount(index, minlength=num_targets), 0, out=offsets[1:])
    return order, offsets


def scatter_add_rows(rows: torch.Tensor, index: torch.Tensor, num_targets: int) -> torch.Tensor:
    """``zeros(num_targets, h).index_add_(0, index, rows)`` without atomics: a segment sum over the
    inverse of ``index`` (deterministic)."""
    order, offsets = inverse_index(index, num_targets)
    return segment_sum(rows, order, offsets)


class Permute(torch.autograd.Function):
    """``x[index]``; the backward sums each row's gradients back without atomics."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.num_rows = x.shape[0]
        return gather_rows(x, index)

    @staticmethod
    def backward(ctx, grad_out):
        (index,) = ctx.saved_tensors
        return scatter_add_rows(grad_out, index, ctx.num_rows), None


class Combine(torch.autograd.Function):
    """``out[t] = sum_a weight[a] * expert_output[row_of_assignment[a]]`` over token t's assignments."""

    @staticmethod
    def forward(ctx, expert_output, weight, row_of_assignment, token_offsets):
        # The expert rows are kept for the gates' gradient only; otherwise they are freed after forward.
        kept_rows = expert_output if ctx.needs_input_grad[1] else None
        ctx.save_for_backward(kept_rows, weight, row_of_assignment, token_offsets)
        ctx.rows_shape, ctx.rows_dtype = expert_output.shape, expert_output.dtype
        return segment_sum(expert_output, row_of_assignment, token_offsets, weight)

    @staticmethod
    def backward(ctx, grad_out):
        expert_output, weight, row_of_assignment, token_offsets = ctx.saved_tensors
        needs_rows, needs_weight = ctx.needs_input_grad[:2]
        grad_out = grad_out.contiguous()
        num_rows, hidden = ctx.rows_shape
        grad_rows = grad_weight = None
        if needs_rows:
            # Rows no assignment reads (none for a DispatchPlan's permutation) get zero gradient.
            new_rows = torch.empty if num_rows == row_of_assignment.numel() else torch.zeros
            grad_rows = new_rows(ctx.rows_shape, dtype=ctx.rows_dtype, device=grad_out.device)
        if needs_weight:
            expert_output = expert_output.contiguous()
            grad_weight = torch.empty_like(weight)
        num_tokens = token_offsets.numel() - 1
        if num_tokens > 0 and row_of_assignment.numel() > 0:
            t = tiles.movement_tiles(hidden, row_of_assignment.numel() / num_tokens)
            _combine_backward_kernel[(num_tokens,)](
                grad_out, expert_output if needs_weight else grad_rows, weight.contiguous(),
                row_of_assignment.contiguous(), token_offsets.contiguous(),
                grad_rows if needs_rows else expert_output, grad_weight if needs_weight else weight,
                hidden, grad_out.stride(0), hidden,
                NEEDS_GRAD_ROWS=needs_rows, NEEDS_GRAD_WEIGHT=needs_weight,
                ACC_DTYPE=_tl_dtype(accumulation_dtype(ctx.rows_dtype, weight.dtype)),
                BLOCK_ROWS=t.block_rows, BLOCK_H=t.block_h, num_warps=t.num_warps,
            )
        return grad_rows, grad_weight, None, None


def permute(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` with autograd (the reference is :func:`granular_moe.ops.reference.permute`)."""
    return Permute.apply(x, index)


def combine(
    expert_output: torch.Tensor, weight: torch.Tensor, row_of_assignment: torch.Tensor, token_offsets: torch.Tensor
) -> torch.Tensor:
    """Same contract as :func:`granular_moe.ops.reference.combine`; ``row_of_assignment`` must not repeat a
    row (a :class:`~granular_moe.ops.plan.DispatchPlan`'s never does), so the backward writes each row once."""
    return Combine.apply(expert_output, weight, row_of_assignment, token_offsets)
