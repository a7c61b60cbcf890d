"""Routing metadata in Triton: per-expert counts and a stable counting sort of the assignments by expert.

Two passes over blocks of ``BLOCK`` token-major assignments, no atomics:

1. ``_block_histogram_kernel``: per block, the count of each expert (``counts [blocks, E]``).
2. Offsets (exclusive scans over that small matrix, torch ``cumsum``): where expert ``e``'s rows from
   block ``b`` start in the expert-sorted order.
3. ``_scatter_kernel``: per block, the rank of every assignment among the block's keys
   ``expert * BLOCK + position`` (distinct, so equal experts keep their token order: the sort is stable),
   counted against ``CHUNK`` keys at a time; from it every assignment's row and every row's source token.
   The token of an assignment is found by binary search in ``token_offsets``.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import triton
import triton.language as tl

from granular_moe.ops import reference
from granular_moe.ops.plan import DispatchPlan, ExpertParallelPlan, index_dtype
from granular_moe.ops.triton import tiles
from granular_moe.ops.triton.primitives import add


@triton.jit
def _load_experts(expert_index_ptr, assignment, num_assignments, num_experts, BINS: tl.constexpr):
    """Experts of ``assignment`` as int32; padding lanes and out-of-range entries get the spare bin."""
    experts = tl.load(expert_index_ptr + assignment, mask=assignment < num_assignments, other=BINS - 1)
    return tl.where((experts >= 0) & (experts < num_experts), experts, BINS - 1).to(tl.int32)


@triton.jit
def _block_histogram_kernel(
    expert_index_ptr, counts_ptr, num_assignments, num_experts,
    BLOCK: tl.constexpr, BINS: tl.constexpr,
):
    block = tl.program_id(0)
    assignment = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    counts = tl.histogram(_load_experts(expert_index_ptr, assignment, num_assignments, num_experts, BINS), BINS)
    bins = tl.arange(0, BINS)
    tl.store(counts_ptr + block * num_experts + bins, counts, mask=bins < num_experts)


@triton.jit
def _scatter_kernel(
    expert_index_ptr, token_offsets_ptr, row_shift_ptr, source_token_ptr, row_of_assignment_ptr,
    num_assignments, num_tokens, num_experts, search_steps,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, BINS: tl.constexpr,
):
    block = tl.program_id(0)
    first = block.to(tl.int64) * BLOCK
    position = tl.arange(0, BLOCK)
    assignment = first + position
    expert = _load_experts(expert_index_ptr, assignment, num_assignments, num_experts, BINS)
    key = expert * BLOCK + position
    # rank = how many keys of the block are smaller = position in the block's sorted order
    rank = tl.full([BLOCK], 0, tl.int32)
    for chunk_start in range(0, BLOCK, CHUNK):
        other_position = chunk_start + tl.arange(0, CHUNK)
        other_expert = _load_experts(expert_index_ptr, first + other_position, num_assignments, num_experts, BINS)
        smaller = (other_expert * BLOCK + other_position)[None, :] < key[:, None]
        rank += tl.reduce(smaller.to(tl.int32), 1, add)
    valid = expert < num_experts
    # row = (first row of this expert's run from this block) - (start of the run in the block) + rank
    row = tl.load(row_shift_ptr + block * num_experts + expert, mask=valid, other=0) + rank
    # token of an assignment: the largest t with token_offsets[t] <= assignment
    low = tl.full([BLOCK], 0, tl.int64)
    high = tl.full([BLOCK], 0, tl.int64) + num_tokens
    for _ in range(search_steps):
        middle = (low + high) // 2
        below = tl.load(token_offsets_ptr + middle, mask=valid, other=0) <= assignment
        low = tl.where(below, middle, low)
        high = tl.where(below, high, middle)
    tl.store(row_of_assignment_ptr + assignment, row.to(row_of_assignment_ptr.dtype.element_ty), mask=valid)
    tl.store(source_token_ptr + row, low.to(source_token_ptr.dtype.element_ty), mask=valid)


@torch.library.custom_op("granular_moe::dispatch_plan", mutates_args=())
def dispatch_plan_op(
    expert_index: torch.Tensor, token_offsets: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(source_token, row_of_assignment, tokens_per_expert)`` of a :class:`DispatchPlan`."""
    device = expert_index.device
    num_assignments = expert_index.numel()
    num_tokens = token_offsets.numel() - 1
    dtype = index_dtype(max(num_assignments, num_tokens + 1))
    if num_assignments == 0:
        empty = torch.empty(0, dtype=dtype, device=device)
        return empty, empty.clone(), torch.zeros(num_experts, dtype=torch.int64, device=device)
    expert_index = expert_index.contiguous()
    token_offsets = token_offsets.contiguous()
    block, chunk = tiles.routing_tiles(num_assignments)
    bins = triton.next_power_of_2(num_experts + 1)  # one spare bin for padding lanes
    num_blocks = triton.cdiv(num_assignments, block)

    counts = torch.empty(num_blocks, num_experts, dtype=torch.int32, device=device)
    _block_histogram_kernel[(num_blocks,)](expert_index, counts, num_assignments, num_experts, BLOCK=block, BINS=bins)

    counts = counts.to(torch.int64)
    tokens_per_expert = counts.sum(0)
    expert_start = tokens_per_expert.cumsum(0) - tokens_per_expert  # first row of each expert
    earlier_blocks = counts.cumsum(0) - counts  # rows of expert e from blocks before b
    earlier_experts = counts.cumsum(1) - counts  # position in block b's sorted keys where expert e starts
    row_shift = (expert_start + earlier_blocks - earlier_experts).contiguous()

    source_token = torch.empty(num_assignments, dtype=dtype, device=device)
    row_of_assignment = torch.empty(num_assignments, dtype=dtype, device=device)
    search_steps = max(1, num_tokens).bit_length()
    _scatter_kernel[(num_blocks,)](
        expert_index, token_offsets, row_shift, source_token, row_of_assignment,
        num_assignments, num_tokens, num_experts, search_steps, BLOCK=block, CHUNK=chunk, BINS=bins,
    )
    return source_token, row_of_assignment, tokens_per_expert


@dispatch_plan_op.register_fake
def _(expert_index, token_offsets, num_experts):
    num_assignments = expert_index.numel()
    index = expert_index.new_empty(num_assignments, dtype=index_dtype(max(num_assignments, token_offsets.shape[0])))
    return index, torch.empty_like(index), expert_index.new_empty(num_experts, dtype=torch.int64)


def dispatch_plan(expert_index: torch.Tensor, token_offsets: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Routing metadata: per-expert counts and a stable sort of the assignments by expert.

    Same contract as :func:`granular_moe.ops.reference.dispatch_plan`; ``expert_index`` must lie in
    ``[0, num_experts)`` (out-of-range entries are left out of the counts and their rows are not written).
    """
    return DispatchPlan(*torch.ops.granular_moe.dispatch_plan(expert_index, token_offsets, num_experts))


# The expert-parallel plan is a few torch ops (a sort of a rank's assignments by destination), registered as an
# operator beside the kernels so that a compiled graph treats it as one: its output sizes depend on the routing.
@torch.library.custom_op("granular_moe::expert_parallel_plan", mutates_args=())
def expert_parallel_plan_op(
    expert_index: torch.Tensor, token_offsets: torch.Tensor, num_local_experts: int, ep_size: int
) -> list[torch.Tensor]:
    """The fields of an :class:`ExpertParallelPlan`, in order."""
    plan = reference.expert_parallel_plan(expert_index, token_offsets, num_local_experts, ep_size)
    return [getattr(plan, field.name) for field in dataclasses.fields(ExpertParallelPlan)]


@expert_parallel_plan_op.register_fake
def _(expert_index, token_offsets, num_local_experts, ep_size):
    pairs = torch.library.get_ctx().new_dynamic_size()  # one row per (token, destination rank)
    index = functools.partial(expert_index.new_empty, dtype=torch.int64)
    return [index(pairs), index(pairs), index(expert_index.numel()), index(ep_size), index(ep_size),
            index(token_offsets.shape[0]), index(pairs)]


def expert_parallel_plan(
    expert_index: torch.Tensor, token_offsets: torch.Tensor, num_local_experts: int, ep_size: int
) -> ExpertParallelPlan:
    """See :func:`granular_moe.ops.reference.expert_parallel_plan`."""
    return ExpertParallelPlan(
        *torch.ops.granular_moe.expert_parallel_plan(expert_index, token_offsets, num_local_experts, ep_size))
