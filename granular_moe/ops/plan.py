"""The dispatch plan: where every routed assignment goes and comes back from."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    """Expert-sorted layout of a :class:`~granular_moe.router.Routing`.

    Row ``i`` of the expert input is token ``source_token[i]``; rows of expert ``e`` are contiguous and in
    token order, ``tokens_per_expert[e]`` of them. Assignment ``a`` (token-major) reads its expert output
    from row ``row_of_assignment[a]``.
    """

    source_token: torch.Tensor  # [A] int64
    row_of_assignment: torch.Tensor  # [A] int64
    tokens_per_expert: torch.Tensor  # [E] int64
