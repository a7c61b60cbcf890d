"""GranularMoELayer: a fine-grained drop-in for megatron-core's ``MoELayer``."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.module import MegatronModule

from granular_moe.config import check_layer_config
from granular_moe.dispatch import LocalDispatcher
from granular_moe.experts import GroupedExperts
from granular_moe.ops import check_kernel_backend
from granular_moe.router import RoutingStats, build_router


class GranularMoELayer(MegatronModule):
    """Router -> dispatch -> grouped expert MLPs -> combine, on ``[s, b, h]`` hidden states.

    Built from a ``ModuleSpec`` (see :mod:`granular_moe.megatron`) with a ``TransformerConfig`` whose
    ``num_moe_experts``, ``moe_router_topk`` and ``moe_ffn_hidden_size`` already hold the fine-grained
    values (:func:`granular_moe.config.apply_granularity`). ``forward`` returns ``(output, None)`` like
    Megatron's MLPs. Parameters: ``router.weight [num_experts, hidden]``,
    ``experts.weight1 [num_local_experts, hidden, expert_hidden (x2 if gated)]``,
    ``experts.weight2 [num_local_experts, expert_hidden, hidden]``.

    After each forward, ``stats`` holds the layer's :class:`~granular_moe.router.RoutingStats`.

    Args:
        router_type: ``token_choice`` (top-k experts per token) or ``expert_choice`` (top-C tokens per
            expert).
        kernels: ``auto`` or ``torch`` (see :mod:`granular_moe.ops`).
    """

    def __init__(
        self,
        config,
        submodules=None,
        layer_number: Optional[int] = None,
        pg_collection=None,
        router_type: str = "token_choice",
        kernels: str = "auto",
    ):
        super().__init__(config)
        check_layer_config(config, router_type)
        check_kernel_backend(kernels)
        self.router_type = router_type
        self.router = build_router(router_type, config)
        self.experts = GroupedExperts(config, config.num_moe_experts, kernels)
        self.dispatcher = LocalDispatcher(kernels)
        self.stats: Optional[RoutingStats] = None
        if layer_number is not None:
            self.set_layer_number(layer_number)

    def set_layer_number(self, layer_number: int) -> None:
        """Called by Megatron's ``TransformerLayer``; names this layer in the aux-loss tracker."""
        self.layer_number = layer_number
        self.router.set_layer_number(layer_number)

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """``hidden_states [s, b, h]`` -> ``(output [s, b, h], None)``.

        ``padding_mask [b, s]`` (True marks padding, Megatron's convention) removes padding tokens from
        the router's losses; they are still routed.
        """
        seq, batch, hidden = hidden_states.shape
        x = hidden_states.reshape(seq * batch, hidden)
        valid = None if padding_mask is None else ~padding_mask.transpose(0, 1).reshape(-1)
        routing, self.stats = self.router(x, valid)
        output = self.dispatcher(x, routing, self.experts)
        return output.view(seq, batch, hidden), None
