"""All local experts of a layer as one pair of 3-D weights."""

from __future__ import annotations

from typing import Optional

import torch

from granular_moe.ops import kernels_for


class GroupedExperts(torch.nn.Module):
    """``num_local_experts`` expert MLPs ``h -> expert_hidden -> h``.

    Parameters (the public layout checkpoint tools rely on):
    ``weight1 [num_local_experts, hidden, expert_hidden]`` (``2 * expert_hidden`` with a gated linear
    unit: activation input first, linear gate second) and ``weight2 [num_local_experts, expert_hidden,
    hidden]``.
    """

    def __init__(self, config, num_local_experts: int, kernels: str = "auto"):
        super().__init__()
        self.config = config
        self.num_local_experts = num_local_experts
        self.activation = config.activation_func
        self.gated = config.gated_linear_unit
        self.kernels = kernels
        hidden, expert_hidden = config.hidden_size, config.moe_ffn_hidden_size
        fc1_width = expert_hidden * (2 if self.gated else 1)
        device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else "cuda"
        dtype = config.params_dtype
        self.weight1 = torch.nn.Parameter(
            torch.empty(num_local_experts, hidden, fc1_width, dtype=dtype, device=device)
        )
        self.weight2 = torch.nn.Parameter(
            torch.empty(num_local_experts, expert_hidden, hidden, dtype=dtype, device=device)
        )
        if config.perform_initialization:
            config.init_method(self.weight1)
            config.output_layer_init_method(self.weight2)
        for weight in (self.weight1, self.weight2):
            # Expert weights: gradients are reduced over the expert-data-parallel group only.
            setattr(weight, "allreduce", False)

    def forward(
        self, x: torch.Tensor, tokens_per_expert: torch.Tensor, gather_index: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Expert outputs for expert-sorted rows (``x[gather_index]`` when ``gather_index`` is given)."""
        ops = kernels_for(self.kernels, x.device)
        return ops.grouped_mlp(
            x, tokens_per_expert, self.weight1, self.weight2, self.activation, self.gated, gather_index
        )
