"""Grouped expert MLP in Triton: ``act(x[gather]_e @ weight1[e]) @ weight2[e]`` for many small experts.

Two kernels cover the forward and the whole backward:

* ``_grouped_rows_kernel``: ``rows_e @ B[e]`` over expert-sorted rows. The grid is one program per
  (row tile, column tile); row tiles never straddle two experts (each expert's rows are cut into
  ``ceil(rows_e / BLOCK_M)`` tiles, so an expert with no rows has no tile); the tile-to-expert map is made
  on the device (``searchsorted`` over the cumulative tile counts) and the grid is sized by an upper bound,
  so the routing counts never travel to the host. The
  row gather is fused into the A-operand loads (``x[gather_index[row]]``), and the epilogue does the
  activation: forward ``h -> act(h)`` (gated: ``act(h[:, :f]) * h[:, f:]``, two accumulators), backward
  ``d act -> dh`` from the saved ``h``.
* ``_grouped_weight_grad_kernel``: ``dW[e] = A_e^T @ B_e``, one program per (expert, output tile),
  reducing over the expert's rows; the gather is fused here too. An expert with no rows gets exact zeros.

Forward saves only the pre-activation ``h`` (not ``act(h)``); the backward recomputes ``act(h)`` in the
same epilogue that turns ``d act`` into ``dh``. The input gradient of gathered rows is summed back per
source row by a segment sum over the inverse gather (sorted once with torch), deterministic, no atomics.
All accumulation is fp32; fp32 operands multiply in IEEE fp32 unless torch allows TF32
(``torch.backends.cuda.matmul.allow_tf32``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from granular_moe.ops.triton import tiles
from granular_moe.ops.triton.activations import activation_derivative, apply_activation
from granular_moe.ops.triton.movement import scatter_add_rows

# Epilogues of the rows kernel
STORE = tl.constexpr(0)  # out = acc
ACTIVATE = tl.constexpr(1)  # h = acc (saved), act = act(h)
ACTIVATION_GRAD = tl.constexpr(2)  # acc is d act; out = dh from the saved h (and act = act(h) if asked)


@triton.jit
def _grouped_rows_kernel(
    a_ptr, gather_ptr, b_ptr, out_ptr, h_ptr, act_ptr, expert_offsets_ptr, tile_offsets_ptr, tile_expert_ptr,
    num_experts, N, K, gate_offset,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_out, stride_h, stride_act,
    EPILOGUE: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr, GATHER: tl.constexpr,
    WRITE_ACT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_col_tiles = (N + BLOCK_N - 1) // BLOCK_N
    tile = pid // num_col_tiles
    expert = tl.load(tile_expert_ptr + tile)
    if expert >= num_experts:  # past the last tile (the grid is sized without reading the counts)
        return
    rows = (
        tl.load(expert_offsets_ptr + expert)
        + (tile - tl.load(tile_offsets_ptr + expert)) * BLOCK_M
        + tl.arange(0, BLOCK_M)
    )
    row_mask = rows < tl.load(expert_offsets_ptr + expert + 1)
    if GATHER:
        source = tl.load(gather_ptr + rows, mask=row_mask, other=0)
    else:
        source = rows
    cols = (pid % num_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    depth = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + source[:, None] * stride_am + depth[None, :] * stride_ak
    b_ptrs = b_ptr + expert.to(tl.int64) * stride_be + depth[:, None] * stride_bk + cols[None, :] * stride_bn
    two_accumulators: tl.constexpr = GATED and EPILOGUE == ACTIVATE
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    if two_accumulators:
        acc_gate = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k_start in range(0, K, BLOCK_K):
        depth_mask = (k_start + depth) < K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & depth_mask[None, :], other=0.0)
        b_mask = depth_mask[:, None] & col_mask[None, :]
        acc = tl.dot(a, tl.load(b_ptrs, mask=b_mask, other=0.0), acc, input_precision=INPUT_PRECISION)
        if two_accumulators:
            b_gate = tl.load(b_ptrs + gate_offset * stride_bn, mask=b_mask, other=0.0)
            acc_gate = tl.dot(a, b_gate, acc_gate, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    mask = row_mask[:, None] & col_mask[None, :]
    h_ptrs = h_ptr + rows[:, None] * stride_h + cols[None, :]
    act_ptrs = act_ptr + rows[:, None] * stride_act + cols[None, :]
    if EPILOGUE == STORE:
        tl.store(out_ptr + rows[:, None] * stride_out + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == ACTIVATE:
        # The activation reads h rounded to its storage dtype, the value the backward re-reads.
        h = acc.to(h_ptr.dtype.element_ty)
        tl.store(h_ptrs, h, mask=mask)
        act = apply_activation(h.to(tl.float32), ACTIVATION)
        if GATED:
            gate = acc_gate.to(h_ptr.dtype.element_ty)
            tl.store(h_ptrs + gate_offset, gate, mask=mask)
            act = act * gate.to(tl.float32)
        tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=mask)
    else:
        tl.static_assert(EPILOGUE == ACTIVATION_GRAD, "unknown epilogue")
        out_ptrs = out_ptr + rows[:, None] * stride_out + cols[None, :]
        h = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            gate = tl.load(h_ptrs + gate_offset, mask=mask, other=0.0).to(tl.float32)
            activated = apply_activation(h, ACTIVATION)
            grad_h = acc * gate * activation_derivative(h, ACTIVATION)
            tl.store(out_ptrs, grad_h.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(out_ptrs + gate_offset, (acc * activated).to(out_ptr.dtype.element_ty), mask=mask)
            if WRITE_ACT:
                tl.store(act_ptrs, (activated * gate).to(act_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptrs, (acc * activation_derivative(h, ACTIVATION)).to(out_ptr.dtype.element_ty), mask=mask)
            if WRITE_ACT:
                tl.store(act_ptrs, apply_activation(h, ACTIVATION).to(act_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_weight_grad_kernel(
    a_ptr, gather_ptr, b_ptr, out_ptr, expert_offsets_ptr, K, N,
    stride_am, stride_ak, stride_bm, stride_bn, stride_oe, stride_ok, stride_on,
    GATHER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[e] = A_e^T @ B_e`` (``[K, N]``) over expert e's rows (program 1 is the expert)."""
    pid = tl.program_id(0)
    expert = tl.program_id(1)
    num_col_tiles = (N + BLOCK_N - 1) // BLOCK_N
    out_rows = (pid // num_col_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
    out_cols = (pid % num_col_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    out_row_mask = out_rows < K
    out_col_mask = out_cols < N
    start = tl.load(expert_offsets_ptr + expert)
    end = tl.load(expert_offsets_ptr + expert + 1)
    acc = tl.full([BLOCK_K, BLOCK_N], 0.0, tl.float32)
    for row_start in range(start, end, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        if GATHER:
            source = tl.load(gather_ptr + rows, mask=row_mask, other=0)
        else:
            source = rows
        a = tl.load(
            a_ptr + source[:, None] * stride_am + out_rows[None, :] * stride_ak,
            mask=row_mask[:, None] & out_row_mask[None, :], other=0.0,
        )
        b = tl.load(
            b_ptr + rows[:, None] * stride_bm + out_cols[None, :] * stride_bn,
            mask=row_mask[:, None] & out_col_mask[None, :], other=0.0,
        )
        acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)
    tl.store(
        out_ptr + expert.to(tl.int64) * stride_oe + out_rows[:, None] * stride_ok + out_cols[None, :] * stride_on,
        acc.to(out_ptr.dtype.element_ty), mask=out_row_mask[:, None] & out_col_mask[None, :],
    )


def _input_precision(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


class ExpertRows:
    """Where each expert's rows lie in the expert-sorted order, and how they cut into row tiles (per tile
    height), computed on the device from ``tokens_per_expert``."""

    def __init__(self, tokens_per_expert: torch.Tensor, num_rows: int):
        self.tokens_per_expert = tokens_per_expert.to(torch.int64)
        self.num_experts = tokens_per_expert.numel()
        self.num_rows = num_rows
        self.offsets = torch.nn.functional.pad(self.tokens_per_expert.cumsum(0), (1, 0))
        self._tiles = {}

    @property
    def rows_per_expert(self) -> float:
        return self.num_rows / max(1, self.num_experts)

    def max_tiles(self, block_m: int) -> int:
        """An upper bound on the tile count known without reading the counts: sum ceil(n_e / m) <= N / m + E."""
        return triton.cdiv(self.num_rows, block_m) + self.num_experts

    def tiles(self, block_m: int):
        """``(tile_offsets [E + 1], tile_expert [max_tiles])``: cumulative ``block_m``-row tiles per expert,
        and the expert of every tile (``E`` past the last one)."""
        if block_m not in self._tiles:
            tiles_per_expert = (self.tokens_per_expert + block_m - 1) // block_m
            tile_offsets = torch.nn.functional.pad(tiles_per_expert.cumsum(0), (1, 0))
            tile_ids = torch.arange(self.max_tiles(block_m), device=tile_offsets.device)
            tile_expert = torch.searchsorted(tile_offsets[1:], tile_ids, right=True).to(torch.int32)
            self._tiles[block_m] = (tile_offsets, tile_expert)
        return self._tiles[block_m]


def _rows_gemm(
    layout: ExpertRows, a: torch.Tensor, b: torch.Tensor, n: int, *, epilogue: int,
    gather_index: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
    h: Optional[torch.Tensor] = None, act: Optional[torch.Tensor] = None,
    activation: str = "gelu", gated: bool = False, gate_offset: int = 0,
) -> None:
    """Launch the rows kernel: ``rows_e @ b[e]`` with ``b [E, K, n]`` (any strides)."""
    k = b.shape[1]
    wide_epilogue = epilogue == ACTIVATION_GRAD or (gated and epilogue == ACTIVATE)
    t = tiles.row_gemm_tiles(layout.rows_per_expert, n, k, a.dtype, wide_epilogue)
    grid = (layout.max_tiles(t.block_m) * triton.cdiv(n, t.block_n),)
    if layout.num_rows == 0 or grid[0] == 0:
        return
    placeholder = a
    _grouped_rows_kernel[grid](
        a, placeholder if gather_index is None else gather_index, b,
        placeholder if out is None else out, placeholder if h is None else h, placeholder if act is None else act,
        layout.offsets, *layout.tiles(t.block_m), layout.num_experts, n, k, gate_offset,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        0 if out is None else out.stride(0), 0 if h is None else h.stride(0), 0 if act is None else act.stride(0),
        EPILOGUE=epilogue, GATED=gated, ACTIVATION=activation, GATHER=gather_index is not None,
        WRITE_ACT=act is not None, INPUT_PRECISION=_input_precision(a.dtype),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.num_warps, num_stages=t.num_stages,
    )


def _weight_grad(
    layout: ExpertRows, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype,
    gather_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``out[e] = a[rows_e]^T @ b[rows_e]`` (``a`` rows through ``gather_index`` when given)."""
    k, n = a.shape[1], b.shape[1]
    out = torch.empty(layout.num_experts, k, n, dtype=out_dtype, device=a.device)
    if out.numel() == 0:
        return out
    t = tiles.weight_grad_tiles(k, n, a.dtype)
    grid = (triton.cdiv(k, t.block_k) * triton.cdiv(n, t.block_n), layout.num_experts)
    _grouped_weight_grad_kernel[grid](
        a, a if gather_index is None else gather_index, b, out, layout.offsets, k, n,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1), out.stride(2),
        GATHER=gather_index is not None, INPUT_PRECISION=_input_precision(a.dtype),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.num_warps, num_stages=t.num_stages,
    )
    return out


class GroupedMLP(torch.autograd.Function):
    """``act(x[gather_index]_e @ weight1[e]) @ weight2[e]`` per expert, with gradients for ``x`` and both
    weights. ``activation`` is a fused name (:data:`~granular_moe.ops.triton.activations.FUSED_ACTIVATIONS`)."""

    @staticmethod
    def forward(ctx, x, weight1, weight2, tokens_per_expert, gather_index, activation, gated):
        x = x.contiguous()
        if gather_index is not None:
            gather_index = gather_index.contiguous()  # the kernels read it with stride 1
        num_rows = x.shape[0] if gather_index is None else gather_index.numel()
        layout = ExpertRows(tokens_per_expert, num_rows)
        expert_hidden = weight2.shape[1]
        h = torch.empty(num_rows, weight1.shape[2], dtype=x.dtype, device=x.device)
        act = torch.empty(num_rows, expert_hidden, dtype=x.dtype, device=x.device)
        _rows_gemm(
            layout, x, weight1, expert_hidden, epilogue=ACTIVATE, gather_index=gather_index, h=h, act=act,
            activation=activation, gated=gated, gate_offset=expert_hidden if gated else 0,
        )
        out = torch.empty(num_rows, weight2.shape[2], dtype=x.dtype, device=x.device)
        _rows_gemm(layout, act, weight2, weight2.shape[2], epilogue=STORE, out=out)
        ctx.save_for_backward(x, weight1, weight2, gather_index, h)
        ctx.layout, ctx.activation, ctx.gated = layout, activation, gated
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight1, weight2, gather_index, h = ctx.saved_tensors
        layout = ctx.layout
        needs_x, needs_w1, needs_w2 = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous()
        expert_hidden = weight2.shape[1]
        gate_offset = expert_hidden if ctx.gated else 0
        # d act = grad_out @ weight2[e]^T; the epilogue turns it into dh and recomputes act(h) for dW2.
        grad_h = torch.empty_like(h)
        act = torch.empty(h.shape[0], expert_hidden, dtype=h.dtype, device=h.device) if needs_w2 else None
        _rows_gemm(
            layout, grad_out, weight2.transpose(1, 2), expert_hidden, epilogue=ACTIVATION_GRAD,
            out=grad_h, h=h, act=act, activation=ctx.activation, gated=ctx.gated, gate_offset=gate_offset,
        )
        grad_w2 = _weight_grad(layout, act, grad_out, weight2.dtype) if needs_w2 else None
        del act
        grad_w1 = _weight_grad(layout, x, grad_h, weight1.dtype, gather_index) if needs_w1 else None
        grad_x = None
        if needs_x:
            grad_rows = torch.empty(layout.num_rows, x.shape[1], dtype=x.dtype, device=x.device)
            _rows_gemm(layout, grad_h, weight1.transpose(1, 2), x.shape[1], epilogue=STORE, out=grad_rows)
            del grad_h
            grad_x = grad_rows if gather_index is None else scatter_add_rows(grad_rows, gather_index, x.shape[0])
        return grad_x, grad_w1, grad_w2, None, None, None, None


def grouped_mlp(
    x: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    weight1: torch.Tensor,
    weight2: torch.Tensor,
    activation: str,
    gated: bool,
    gather_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The expert MLPs (contract of :func:`granular_moe.ops.reference.grouped_mlp`, with ``activation`` a
    fused name). ``tokens_per_expert`` must sum to the row count; it stays on the device (no host sync)."""
    return GroupedMLP.apply(x, weight1, weight2, tokens_per_expert, gather_index, activation, gated)
