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
    source = tl.load(index_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # int32 indices: 64-bit offsets
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
        source = tl.load(row_index_ptr + entries, mask=entry_mask, other=0).to(tl.int64)
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
    HAS_WEIGHT: tl.constexpr, NEEDS_GRAD_ROWS: tl.constexpr, NEEDS_GRAD_WEIGHT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """For one token: ``grad_rows[row[a]] = weight[a] * grad_out[t]`` (``grad_out[t]`` without weights) and
    ``grad_weight[a] = <grad_out[t], expert_output[row[a]]>`` over its assignments ``a``."""
    token = tl.program_id(0).to(tl.int64)
    start = tl.load(offsets_ptr + token)
    end = tl.load(offsets_ptr + token + 1)
    for chunk in range(start, end, BLOCK_ROWS):
        entries = chunk + tl.arange(0, BLOCK_ROWS)
        entry_mask = entries < end
        row = tl.load(row_of_assignment_ptr + entries, mask=entry_mask, other=0).to(tl.int64)
        if HAS_WEIGHT:
            weight = tl.load(weight_ptr + entries, mask=entry_mask, other=0.0).to(ACC_DTYPE)
        else:
            weight = tl.full([BLOCK_ROWS], 1.0, ACC_DTYPE)
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


# Permute and combine as torch operators (``torch.ops.granular_moe.*``): opaque to torch.compile, which traces
# through them with the fake implementations below.


@torch.library.custom_op("granular_moe::permute", mutates_args=())
def permute_op(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]``."""
    return gather_rows(x, index)


@permute_op.register_fake
def _(x, index):
    return x.new_empty(index.numel(), x.shape[1])


@torch.library.custom_op("granular_moe::scatter_add_rows", mutates_args=())
def scatter_add_rows_op(rows: torch.Tensor, index: torch.Tensor, num_targets: int) -> torch.Tensor:
    """``zeros(num_targets, h).index_add_(0, index, rows)``, deterministic (the permute's backward)."""
    return scatter_add_rows(rows, index, num_targets)


@scatter_add_rows_op.register_fake
def _(rows, index, num_targets):
    return rows.new_empty(num_targets, rows.shape[1])


def _setup_permute(ctx, inputs, output):
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.num_rows = x.shape[0]


def _permute_backward(ctx, grad_out):
    (index,) = ctx.saved_tensors
    return torch.ops.granular_moe.scatter_add_rows(grad_out, index, ctx.num_rows), None


permute_op.register_autograd(_permute_backward, setup_context=_setup_permute)


@torch.library.custom_op("granular_moe::combine", mutates_args=())
def combine_op(expert_output: torch.Tensor, weight: Optional[torch.Tensor], row_of_assignment: torch.Tensor,
               token_offsets: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_a weight[a] * expert_output[row_of_assignment[a]]`` over token t's assignments."""
    return segment_sum(expert_output, row_of_assignment, token_offsets, weight)


@combine_op.register_fake
def _(expert_output, weight, row_of_assignment, token_offsets):
    return expert_output.new_empty(token_offsets.shape[0] - 1, expert_output.shape[1])


@torch.library.custom_op("granular_moe::combine_backward", mutates_args=())
def combine_backward_op(
    grad_out: torch.Tensor, expert_output: Optional[torch.Tensor], weight: Optional[torch.Tensor],
    row_of_assignment: torch.Tensor, token_offsets: torch.Tensor, num_rows: int, rows_dtype: torch.dtype,
    needs_rows: bool, needs_weight: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the rows (``[num_rows, h]``) and of the weights (an empty tensor for one not needed)."""
    grad_out = grad_out.contiguous()
    hidden = grad_out.shape[1]
    needs_weight = needs_weight and weight is not None
    grad_rows, grad_weight = grad_out.new_empty(0), grad_out.new_empty(0)  # (distinct: outputs may not alias)
    if needs_rows:
        # Rows no assignment reads (none for a DispatchPlan's permutation) get zero gradient.
        new_rows = torch.empty if num_rows == row_of_assignment.numel() else torch.zeros
        grad_rows = new_rows(num_rows, hidden, dtype=rows_dtype, device=grad_out.device)
    if needs_weight:
        expert_output = expert_output.contiguous()
        grad_weight = torch.empty_like(weight)
    num_tokens = token_offsets.numel() - 1
    if num_tokens > 0 and row_of_assignment.numel() > 0 and (needs_rows or needs_weight):
        t = tiles.movement_tiles(hidden, row_of_assignment.numel() / num_tokens)
        dtypes = (rows_dtype,) if weight is None else (rows_dtype, weight.dtype)
        _combine_backward_kernel[(num_tokens,)](
            grad_out, expert_output if needs_weight else grad_out, grad_out if weight is None else weight.contiguous(),
            row_of_assignment.contiguous(), token_offsets.contiguous(),
            grad_rows if needs_rows else grad_out, grad_weight if needs_weight else grad_out,
            hidden, grad_out.stride(0), hidden,
            HAS_WEIGHT=weight is not None, NEEDS_GRAD_ROWS=needs_rows, NEEDS_GRAD_WEIGHT=needs_weight,
            ACC_DTYPE=_tl_dtype(accumulation_dtype(*dtypes)),
            BLOCK_ROWS=t.block_rows, BLOCK_H=t.block_h, num_warps=t.num_warps,
        )
    return grad_rows, grad_weight


@combine_backward_op.register_fake
def _(grad_out, expert_output, weight, row_of_assignment, token_offsets, num_rows, rows_dtype, needs_rows,
      needs_weight):
    nothing = grad_out.new_empty(0)
    grad_rows = grad_out.new_empty(num_rows, grad_out.shape[1], dtype=rows_dtype) if needs_rows else nothing
    grad_weight = torch.empty_like(weight) if needs_weight and weight is not None else nothing.clone()
    return grad_rows, grad_weight


def _setup_combine(ctx, inputs, output):
    expert_output, weight, row_of_assignment, token_offsets = inputs
    # The expert rows are kept for the weights' gradient only; otherwise they are freed after the forward.
    needs_weight = weight is not None and ctx.needs_input_grad[1]
    ctx.save_for_backward(expert_output if needs_weight else None, weight, row_of_assignment, token_offsets)
    ctx.num_rows, ctx.rows_dtype = expert_output.shape[0], expert_output.dtype


def _combine_backward(ctx, grad_out):
    expert_output, weight, row_of_assignment, token_offsets = ctx.saved_tensors
    needs_rows, needs_weight = ctx.needs_input_grad[:2]
    needs_weight = bool(needs_weight) and weight is not None
    grad_rows, grad_weight = torch.ops.granular_moe.combine_backward(
        grad_out, expert_output, weight, row_of_assignment, token_offsets, ctx.num_rows, ctx.rows_dtype,
        bool(needs_rows), needs_weight,
    )
    return grad_rows if needs_rows else None, grad_weight if needs_weight else None, None, None


combine_op.register_autograd(_combine_backward, setup_context=_setup_combine)


def permute(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[index]`` with autograd (the reference is :func:`granular_moe.ops.reference.permute`)."""
    return torch.ops.granular_moe.permute(x, index)


def combine(
    expert_output: torch.Tensor, weight: Optional[torch.Tensor], row_of_assignment: torch.Tensor,
    token_offsets: torch.Tensor,
) -> torch.Tensor:
    """Same contract as :func:`granular_moe.ops.reference.combine`; ``row_of_assignment`` must not repeat a
    row (a :class:`~granular_moe.ops.plan.DispatchPlan`'s never does), so the backward writes each row once."""
    return torch.ops.granular_moe.combine(expert_output, weight, row_of_assignment, token_offsets)
