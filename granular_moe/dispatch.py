"""Token movement between the router and the experts."""

from __future__ import annotations

import torch

from granular_moe.ops import kernels_for
from granular_moe.router import Routing


class LocalDispatcher:
    """Every expert lives on this rank: sort by expert (the gather is fused into the expert kernel's
    loads), run the experts, and combine each token's gated outputs."""

    def __init__(self, kernels: str = "auto"):
        self.kernels = kernels

    def __call__(self, x: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
        ops = kernels_for(self.kernels, x.device)
        plan = ops.dispatch_plan(routing.expert_index, routing.token_offsets, routing.num_experts)
        expert_output = experts(x, plan.tokens_per_expert, gather_index=plan.source_token)
        return ops.combine(expert_output, routing.weight, plan.row_of_assignment, routing.token_offsets)
