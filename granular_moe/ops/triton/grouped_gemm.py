"""Grouped expert MLP in Triton: ``(probs * act(x[gather]_e @ weight1[e])) @ weight2[e]`` for many small experts.

Two kernels cover the forward and the whole backward:

* ``_grouped_rows_kernel``: ``rows_e @ B[e]`` over expert-sorted rows. The grid is one program per
  (row tile, column tile); row tiles never straddle two experts (each expert's rows are cut into
  ``ceil(rows_e / BLOCK_M)`` tiles, so an expert with no rows has no tile); the tile-to-expert map is made
  on the device (``searchsorted`` over the cumulative tile counts) and the grid is sized by an upper bound,
  so the routing counts never travel to the host. The
  row gather is fused into the A-operand loads (``x[gather_index[row]]``), and the epilogue does the
  activation: forward ``h -> probs * act(h)`` (gated: ``act(h[:, :f]) * h[:, f:]``, two accumulators),
  backward ``d(probs * act) -> dh`` from the saved ``h``, with each row's gate gradient
  ``<d(probs * act), act>`` summed over the tile's columns (one partial sum per column tile, added up by torch:
  deterministic, no atomics).
* ``_grouped_weight_grad_kernel``: ``dW[e] = A_e^T @ B_e``, one program per (expert, output tile),
  reducing over the expert's rows; the gather is fused here too. An expert with no rows gets exact zeros.

Forward saves only ``x`` (not gathered), the pre-activation ``h`` and the gates (not ``act(h)``, nor any
row of the model's width); the backward recomputes ``act(h)`` in the same epilogue that turns
``d(probs * act)`` into ``dh``. The input gradient of gathered rows is summed back per
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
from granular_moe.ops.triton.primitives import add

# Epilogues of the rows kernel
STORE = tl.constexpr(0)  # out = acc
ACTIVATE = tl.constexpr(1)  # h = acc (saved), act = act(h)
ACTIVATION_GRAD = tl.constexpr(2)  # acc is d act; out = dh from the saved h (and act = act(h) if asked)


@triton.jit
def _grouped_rows_kernel(
    a_ptr, gather_ptr, b_ptr, out_ptr, h_ptr, act_ptr, probs_ptr, grad_probs_ptr,
    expert_offsets_ptr, tile_offsets_ptr, tile_expert_ptr,
    num_experts, num_rows, N, K, gate_offset,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_out, stride_h, stride_act,
    EPILOGUE: tl.constexpr, GATED: tl.constexpr, ACTIVATION: tl.constexpr, GATHER: tl.constexpr,
    WRITE_ACT: tl.constexpr, HAS_PROBS: tl.constexpr, WRITE_GRAD_PROBS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_col_tiles = (N + BLOCK_N - 1) // BLOCK_N
    col_tile = pid % num_col_tiles
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
        source = tl.load(gather_ptr + rows, mask=row_mask, other=0).to(tl.int64)  # int32 indices: 64-bit offsets
    else:
        source = rows
    cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
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
    if HAS_PROBS:
        prob = tl.load(probs_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
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
        if HAS_PROBS:
            act = act * prob
        tl.store(act_ptrs, act.to(act_ptr.dtype.element_ty), mask=mask)
    else:
        tl.static_assert(EPILOGUE == ACTIVATION_GRAD, "unknown epilogue")
        # acc is d(probs * act); with gates, each row's gate gradient is <acc, act> and d act = probs * acc. The
        # stores come as early as they can, so that few tile-sized values are live at once (registers).
        out_ptrs = out_ptr + rows[:, None] * stride_out + cols[None, :]
        h = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        activated = apply_activation(h, ACTIVATION)
        if GATED:
            gate = tl.load(h_ptrs + gate_offset, mask=mask, other=0.0).to(tl.float32)
        if WRITE_GRAD_PROBS:
            full = activated * gate if GATED else activated
            tl.store(grad_probs_ptr + col_tile * num_rows + rows, tl.reduce(tl.where(mask, acc * full, 0.0), 1, add),
                     mask=row_mask)
        if HAS_PROBS:
            acc = acc * prob
        if WRITE_ACT:
            full = activated * gate if GATED else activated
            if HAS_PROBS:
                full = full * prob
            tl.store(act_ptrs, full.to(act_ptr.dtype.element_ty), mask=mask)
        if GATED:
            tl.store(out_ptrs + gate_offset, (acc * activated).to(out_ptr.dtype.element_ty), mask=mask)
            acc = acc * gate
        tl.store(out_ptrs, (acc * activation_derivative(h, ACTIVATION)).to(out_ptr.dtype.element_ty), mask=mask)


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
            source = tl.load(gather_ptr + rows, mask=row_mask, other=0).to(tl.int64)
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
    probs: Optional[torch.Tensor] = None, grad_probs: Optional[torch.Tensor] = None,
    activation: str = "gelu", gated: bool = False, gate_offset: int = 0,
) -> None:
    """Launch the rows kernel: ``rows_e @ b[e]`` with ``b [E, K, n]`` (any strides). ``grad_probs`` (ACTIVATION_GRAD
    only) receives ``[column tiles, rows]`` partial gate gradients: allocate it with :func:`gate_grad_partials`."""
    k = b.shape[1]
    t = _row_tiles(layout, a, n, k, epilogue, gated, gate_gradient=grad_probs is not None)
    grid = (layout.max_tiles(t.block_m) * triton.cdiv(n, t.block_n),)
    if layout.num_rows == 0 or grid[0] == 0:
        return
    placeholder = a
    _grouped_rows_kernel[grid](
        a, placeholder if gather_index is None else gather_index, b,
        placeholder if out is None else out, placeholder if h is None else h, placeholder if act is None else act,
        placeholder if probs is None else probs, placeholder if grad_probs is None else grad_probs,
        layout.offsets, *layout.tiles(t.block_m), layout.num_experts, layout.num_rows, n, k, gate_offset,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2),
        0 if out is None else out.stride(0), 0 if h is None else h.stride(0), 0 if act is None else act.stride(0),
        EPILOGUE=epilogue, GATED=gated, ACTIVATION=activation, GATHER=gather_index is not None,
        WRITE_ACT=act is not None, HAS_PROBS=probs is not None, WRITE_GRAD_PROBS=grad_probs is not None,
        INPUT_PRECISION=_input_precision(a.dtype),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, num_warps=t.num_warps, num_stages=t.num_stages,
    )


def _row_tiles(layout: ExpertRows, a: torch.Tensor, n: int, k: int, epilogue: int, gated: bool = False,
               gate_gradient: bool = False) -> tiles.GemmTiles:
    wide_epilogue = epilogue == ACTIVATION_GRAD or (gated and epilogue == ACTIVATE)
    return tiles.row_gemm_tiles(layout.rows_per_expert, n, k, a.dtype, wide_epilogue, gate_gradient)


def gate_grad_partials(layout: ExpertRows, grad_out: torch.Tensor, expert_hidden: int) -> torch.Tensor:
    """The ``[column tiles, rows]`` fp32 buffer of the activation backward's per-tile gate gradients."""
    t = _row_tiles(layout, grad_out, expert_hidden, grad_out.shape[1], ACTIVATION_GRAD, gate_gradient=True)
    return torch.zeros(triton.cdiv(expert_hidden, t.block_n), layout.num_rows, dtype=torch.float32,
                       device=grad_out.device)


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


# The grouped MLP as torch operators (``torch.ops.granular_moe.grouped_mlp`` and its backward): opaque to
# torch.compile, which traces through them with the fake implementations below (shapes only). The forward also
# returns h, the first GEMM's output, so that autograd can keep it; the public function returns the rows alone.


@torch.library.custom_op("granular_moe::grouped_mlp", mutates_args=())
def grouped_mlp_op(
    x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor, probs: Optional[torch.Tensor],
    tokens_per_expert: torch.Tensor, gather_index: Optional[torch.Tensor], activation: str, gated: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, h)``: ``rows = (probs * act(h)) @ weight2[e]`` with ``h = x[gather_index]_e @ weight1[e]``."""
    x = x.contiguous()
    if gather_index is not None:
        gather_index = gather_index.contiguous()  # the kernels read it with stride 1
    if probs is not None:
        probs = probs.contiguous()
    num_rows = x.shape[0] if gather_index is None else gather_index.numel()
    layout = ExpertRows(tokens_per_expert, num_rows)
    expert_hidden = weight2.shape[1]
    h = torch.empty(num_rows, weight1.shape[2], dtype=x.dtype, device=x.device)
    act = torch.empty(num_rows, expert_hidden, dtype=x.dtype, device=x.device)
    _rows_gemm(
        layout, x, weight1, expert_hidden, epilogue=ACTIVATE, gather_index=gather_index, h=h, act=act,
        probs=probs, activation=activation, gated=gated, gate_offset=expert_hidden if gated else 0,
    )
    out = torch.empty(num_rows, weight2.shape[2], dtype=x.dtype, device=x.device)
    _rows_gemm(layout, act, weight2, weight2.shape[2], epilogue=STORE, out=out)
    return out, h


@grouped_mlp_op.register_fake
def _(x, weight1, weight2, probs, tokens_per_expert, gather_index, activation, gated):
    num_rows = x.shape[0] if gather_index is None else gather_index.numel()
    return x.new_empty(num_rows, weight2.shape[2]), x.new_empty(num_rows, weight1.shape[2])


@torch.library.custom_op("granular_moe::grouped_mlp_backward", mutates_args=())
def grouped_mlp_backward_op(
    grad_out: torch.Tensor, x: torch.Tensor, weight1: torch.Tensor, weight2: torch.Tensor,
    probs: Optional[torch.Tensor],
    tokens_per_expert: torch.Tensor, gather_index: Optional[torch.Tensor], h: torch.Tensor, activation: str,
    gated: bool, needs_x: bool, needs_weight1: bool, needs_weight2: bool, needs_probs: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of x, weight1, weight2 and probs (an empty tensor for each one not needed)."""
    x = x.contiguous()
    if gather_index is not None:
        gather_index = gather_index.contiguous()
    if probs is not None:
        probs = probs.contiguous()
    layout = ExpertRows(tokens_per_expert, h.shape[0])
    grad_out = grad_out.contiguous()
    expert_hidden = weight2.shape[1]
    gate_offset = expert_hidden if gated else 0
    # d(probs * act) = grad_out @ weight2[e]^T; the epilogue takes the gates' gradient from it, turns it into dh and
    # recomputes probs * act(h) for dW2.
    grad_h = torch.empty_like(h)
    act = torch.empty(h.shape[0], expert_hidden, dtype=h.dtype, device=h.device) if needs_weight2 else None
    partials = gate_grad_partials(layout, grad_out, expert_hidden) if probs is not None and needs_probs else None
    _rows_gemm(
        layout, grad_out, weight2.transpose(1, 2), expert_hidden, epilogue=ACTIVATION_GRAD,
        out=grad_h, h=h, act=act, probs=probs, grad_probs=partials,
        activation=activation, gated=gated, gate_offset=gate_offset,
    )
    grad_probs = x.new_empty(0) if partials is None else partials.sum(0).to(probs.dtype)
    grad_w2 = _weight_grad(layout, act, grad_out, weight2.dtype) if needs_weight2 else x.new_empty(0)
    del act
    grad_w1 = _weight_grad(layout, x, grad_h, weight1.dtype, gather_index) if needs_weight1 else x.new_empty(0)
    grad_x = x.new_empty(0)  # (each unneeded gradient its own empty tensor: outputs may not alias)
    if needs_x:
        grad_rows = torch.empty(layout.num_rows, x.shape[1], dtype=x.dtype, device=x.device)
        _rows_gemm(layout, grad_h, weight1.transpose(1, 2), x.shape[1], epilogue=STORE, out=grad_rows)
        del grad_h
        grad_x = grad_rows if gather_index is None else scatter_add_rows(grad_rows, gather_index, x.shape[0])
    return grad_x, grad_w1, grad_w2, grad_probs


@grouped_mlp_backward_op.register_fake
def _(grad_out, x, weight1, weight2, probs, tokens_per_expert, gather_index, h, activation, gated, needs_x,
      needs_weight1, needs_weight2, needs_probs):
    def like(tensor, needed):
        return torch.empty_like(tensor) if needed and tensor is not None else x.new_empty(0)

    return like(x, needs_x), like(weight1, needs_weight1), like(weight2, needs_weight2), like(probs, needs_probs)


def _setup_grouped_mlp(ctx, inputs, output):
    x, weight1, weight2, probs, tokens_per_expert, gather_index, activation, gated = inputs
    # Kept: x (not gathered), the weights, the gates, the routing counts and index, and h; not act(h), not the rows.
    ctx.save_for_backward(x, weight1, weight2, probs, tokens_per_expert, gather_index, output[1])
    ctx.activation, ctx.gated = activation, gated


def _grouped_mlp_backward(ctx, grad_out, grad_h):
    x, weight1, weight2, probs, tokens_per_expert, gather_index, h = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    grads = torch.ops.granular_moe.grouped_mlp_backward(
        grad_out, x, weight1, weight2, probs, tokens_per_expert, gather_index, h, ctx.activation, ctx.gated,
        *(bool(n) for n in needs),
    )
    return (*(grad if need else None for grad, need in zip(grads, needs)), None, None, None, None)


grouped_mlp_op.register_autograd(_grouped_mlp_backward, setup_context=_setup_grouped_mlp)


def grouped_mlp(
    x: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    weight1: torch.Tensor,
    weight2: torch.Tensor,
    activation: str,
    gated: bool,
    gather_index: Optional[torch.Tensor] = None,
    probs: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The expert MLPs (contract of :func:`granular_moe.ops.reference.grouped_mlp`, with ``activation`` a
    fused name). ``tokens_per_expert`` must sum to the row count; it stays on the device (no host sync)."""
    out, _ = torch.ops.granular_moe.grouped_mlp(x, weight1, weight2, probs, tokens_per_expert, gather_index,
                                                activation, gated)
    return out
