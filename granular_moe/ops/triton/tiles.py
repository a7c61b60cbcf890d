"""Tile sizes of the Triton kernels, chosen per shape from a table (no autotuning: the choice is cheap,
deterministic and the same under the CPU interpreter).

Every size is a power of two and GEMM tiles are at least 16 wide (``tl.dot``'s minimum), so any
``d_expert`` from 32 to 8192 and any token count map onto whole tiles plus masked edges. The table is a
starting point set from the H100's shared memory and register budget; the figures in ``benchmarks/``
are what a retune is judged by.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class GemmTiles:
    """``block_m`` rows x ``block_n`` output columns, ``block_k`` deep per step of the reduction."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MovementTiles:
    """Row-movement kernels (permute, combine, segment sums): ``block_rows`` rows of ``block_h`` columns
    in flight per step."""

    block_rows: int
    block_h: int
    num_warps: int


def _pow2_between(n: float, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(1, int(n)))))


def _max_depth(dtype: torch.dtype) -> int:
    """Deepest reduction step: 64 for 16-bit operands, 32 for 32-bit (twice the bytes per element)."""
    return 64 if dtype.itemsize <= 2 else 32


def row_gemm_tiles(
    rows_per_expert: float, n: int, k: int, dtype: torch.dtype, wide_epilogue: bool = False,
    gate_gradient: bool = False,
) -> GemmTiles:
    """Tiles of ``rows @ weight[e]`` (``[rows_e, k] @ [k, n]``) over expert-sorted rows.

    ``block_m`` follows the mean rows per expert, so small experts waste few masked rows at their last
    tile. A wide epilogue holds several fp32 tiles at once (a gated forward's two accumulators; the
    activation backward's gradient, saved pre-activations and their derivative), and 32-bit operands take
    twice the registers, so both get tiles half as wide, spread over 8 warps: at 128 x 128 on 8 warps they
    spill registers on sm_90 (``benchmarks/kernel_resources.py``). The activation backward that also sums each
    row's gate gradient across the tile (``gate_gradient``) holds more still: at most 64 rows (128 x 64 on 8
    warps spills there).
    """
    half_width = wide_epilogue or dtype.itemsize > 2
    block_m = _pow2_between(rows_per_expert, 16, 64 if gate_gradient else 128)
    block_n = _pow2_between(n, 16, 64 if half_width else 128)
    block_k = _pow2_between(k, 16, _max_depth(dtype))
    num_warps = 8 if block_m * block_n >= (64 * 64 if half_width else 128 * 128) else 4
    return GemmTiles(block_m, block_n, block_k, num_warps, num_stages=3)


def weight_grad_tiles(k: int, n: int, dtype: torch.dtype) -> GemmTiles:
    """Tiles of ``rows_e^T @ other_rows_e`` (``[k, n]`` per expert, reduced over the expert's rows):
    ``block_m`` is the reduction step over rows, ``block_k x block_n`` the output tile; 32-bit operands take
    half-wide tiles (at 128 x 128 on 8 warps fp32 spills registers on sm_90 with Triton 3.7)."""
    block_k = _pow2_between(k, 16, 128)
    block_n = _pow2_between(n, 16, 64 if dtype.itemsize > 2 else 128)
    num_warps = 8 if block_k * block_n >= 128 * 128 else 4
    return GemmTiles(_max_depth(dtype), block_n, block_k, num_warps, num_stages=3)


def movement_tiles(hidden: int, rows_per_segment: float) -> MovementTiles:
    """At most 8192 elements in flight per program: up to 16 rows of a segment (a token's k rows) at once,
    up to 1024 columns per program."""
    block_h = _pow2_between(hidden, 16, 1024)
    block_rows = _pow2_between(rows_per_segment, 1, min(16, 8192 // block_h))
    return MovementTiles(block_rows, block_h, num_warps=4 if block_rows * block_h >= 2048 else 2)


def routing_tiles(num_assignments: int) -> tuple:
    """``(block, chunk)``: assignments per program of the routing kernels, and how many of the block's
    keys each assignment is compared with per step (a ``block x chunk`` tile in registers)."""
    block = _pow2_between(num_assignments, 16, 256)
    return block, min(block, 32)
