"""The dispatch plan: where every routed assignment goes and comes back from."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def index_dtype(count: int) -> torch.dtype:
    """The dtype of the plan's row and token indices: int32 below 2**31 (the backward keeps them: half the bytes of
    int64, per routed assignment), int64 beyond."""
    return torch.int32 if count < 2**31 else torch.int64


@dataclass
class DispatchPlan:
    """Expert-sorted layout of a :class:`~granular_moe.router.Routing`.

    Row ``i`` of the expert input is token ``source_token[i]``; rows of expert ``e`` are contiguous and in
    token order, ``tokens_per_expert[e]`` of them. Assignment ``a`` (token-major) reads its expert output
    from row ``row_of_assignment[a]``. Both indices are :func:`index_dtype` of the assignments (int32 in practice).
    """

    source_token: torch.Tensor  # [A] int32
    row_of_assignment: torch.Tensor  # [A] int32
    tokens_per_expert: torch.Tensor  # [E] int64


@dataclass
class ExpertParallelPlan:
    """How a rank's assignments travel to the expert-parallel ranks: one row per (token, destination rank),
    carrying that token's assignments to the destination's experts.

    Sent rows are grouped by destination rank, in token order within a rank: row ``i`` is token
    ``send_token[i]`` with ``send_row_size[i]`` assignments; ``send_assignments`` lists the assignments
    (token-major indices) in the same order. Coming back, token ``t`` sums the rows
    ``sent_row_of_pair[pair_offsets[t]:pair_offsets[t + 1]]``.
    """

    send_token: torch.Tensor  # [R] int64
    send_row_size: torch.Tensor  # [R] int64
    send_assignments: torch.Tensor  # [A] int64
    rows_per_rank: torch.Tensor  # [EP] int64
    assignments_per_rank: torch.Tensor  # [EP] int64
    pair_offsets: torch.Tensor  # [T + 1] int64
    sent_row_of_pair: torch.Tensor  # [R] int64
