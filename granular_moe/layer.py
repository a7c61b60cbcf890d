"""GranularMoELayer: a fine-grained drop-in for megatron-core's ``MoELayer``."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import MegatronModule

from granular_moe.collectives import gather_tokens, split_tokens
from granular_moe.config import check_layer_config
from granular_moe.dispatch import build_dispatcher, slice_routing
from granular_moe.experts import GroupedExperts
from granular_moe.ops import check_kernel_backend
from granular_moe.parallel import ParallelLayoutError, expert_groups_for
from granular_moe.router import RoutingStats, build_router


@dataclass
class GranularMoESubmodules:
    """What the layer builds besides its router and experts: megatron-core's shared-expert builder
    (``MoESubmodules.shared_experts``), used when the config sets ``moe_shared_expert_intermediate_size``."""

    shared_experts: Optional[Callable] = None


class GranularMoELayer(MegatronModule):
    """Router -> dispatch -> grouped expert MLPs -> combine, on ``[s, b, h]`` hidden states.

    Built by megatron-core's ``TransformerLayer`` from the builder :func:`granular_moe.megatron.granular_moe_spec`
    gives (it calls ``mlp(config=, pg_collection=, is_mtp_layer=, name=)``), with a ``TransformerConfig`` whose
    ``num_moe_experts``, ``moe_router_topk`` and ``moe_ffn_hidden_size`` already hold the fine-grained
    values (:func:`granular_moe.config.apply_granularity`). ``forward`` returns ``(output, None)`` like
    Megatron's MLPs. Parameters: ``router.weight [num_experts, hidden]``,
    ``experts.weight1 [num_local_experts, hidden, expert_hidden (x2 if gated)]``,
    ``experts.weight2 [num_local_experts, expert_hidden, hidden]``; with
    ``--moe-shared-expert-intermediate-size`` megatron-core's ``SharedExpertMLP`` as ``shared_experts``
    (``linear_fc1.weight [shared, hidden]``, ``linear_fc2.weight [hidden, shared]``, tensor-parallel like
    Megatron's; ``gate_weight [1, hidden]`` with ``--moe-shared-expert-gate``), its output added to the routed
    one. ``router.expert_bias [num_experts]`` (fp32 buffer) with ``--moe-router-enable-expert-bias``.

    After each forward, ``stats`` holds the layer's :class:`~granular_moe.router.RoutingStats`.

    Parallelism: experts are spread over the expert-parallel group made by
    :func:`granular_moe.parallel.initialize_model_parallel` or, after megatron-core's own initialisation,
    :func:`granular_moe.parallel.expert_groups_from_megatron` (de-duplicated all-to-all; two levels when the
    group spans nodes, see :func:`granular_moe.dispatch.build_dispatcher`). With tensor parallelism and
    sequence parallelism each rank routes its own sequence shard (router losses over the whole shard group,
    as Megatron does); without sequence parallelism every rank routes all tokens and runs the experts on its
    ``1/TP`` of them, then the outputs are gathered.

    The forward runs the dispatcher's phases (:mod:`granular_moe.dispatch`) around the experts; the shared
    expert runs while the routed tokens travel.

    Args:
        router_type: ``token_choice`` (top-k experts per token) or ``expert_choice`` (top-C tokens per
            expert).
        kernels: ``auto`` or ``torch`` (see :mod:`granular_moe.ops`).
        flat_all_to_all: one all-to-all level over the whole expert-parallel group even when it spans nodes
            (for comparison; two levels otherwise).
        expert_groups: the :class:`~granular_moe.parallel.ExpertParallelGroups` to spread the experts over
            (e.g. built from DeepSpeed's groups outside Megatron); by default those of ``pg_collection`` when it
            carries an expert-parallel group, else the module-level groups of
            :func:`granular_moe.parallel.initialize_model_parallel` / ``expert_groups_from_megatron``
            (:func:`granular_moe.parallel.expert_groups_for`).
    """

    def __init__(
        self,
        config,
        submodules: Optional[GranularMoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection=None,
        is_mtp_layer: bool = False,
        name: Optional[str] = None,
        router_type: str = "token_choice",
        kernels: str = "auto",
        flat_all_to_all: bool = False,
        expert_groups=None,
    ):
        super().__init__(config)
        check_layer_config(config, router_type)
        check_kernel_backend(kernels)
        self.router_type = router_type
        groups = expert_groups if expert_groups is not None else expert_groups_for(pg_collection)
        ep_size, ep_rank = (1, 0) if groups is None else (groups.ep_size, groups.ep_rank)
        if config.expert_model_parallel_size != ep_size:
            raise ParallelLayoutError(
                f"--expert-model-parallel-size {config.expert_model_parallel_size} but the expert-parallel group "
                f"has {ep_size} ranks: call granular_moe.parallel.initialize_model_parallel(expert=...), or "
                f"granular_moe.parallel.expert_groups_from_megatron() after megatron-core's, first"
            )
        self.tp_group = _tensor_parallel_group(pg_collection)
        sequence_sharded = self.tp_group is not None and config.sequence_parallel
        self.router = build_router(router_type, config, token_group=self.tp_group if sequence_sharded else None)
        num_local = config.num_moe_experts // ep_size
        self.experts = GroupedExperts(config, num_local, first_expert=ep_rank * num_local, kernels=kernels,
                                      expert_groups=groups)
        self.dispatcher = build_dispatcher(groups, num_local, kernels, flat=flat_all_to_all)
        self.shared_experts = None
        if config.moe_shared_expert_intermediate_size is not None:
            build_shared = (submodules or GranularMoESubmodules()).shared_experts or _local_shared_experts()
            self.shared_experts = build_shared(
                config=config, pg_collection=pg_collection or _default_pg_collection(),
                gate=config.moe_shared_expert_gate, name=None if name is None else name + ".shared_experts",
            )
        # megatron-core's memory options (--recompute-granularity selective --recompute-modules ...):
        # "moe" (or --moe-layer-recompute) keeps only the layer's input and runs the layer again in the backward;
        # "shared_experts" does so for the shared expert; "moe_act" is what the experts always do (they keep
        # the first GEMM's output and recompute the activation).
        self.recompute_layer = bool(config.moe_layer_recompute) or recompute_selected(config, "moe")
        self.recompute_shared_experts = recompute_selected(config, "shared_experts")
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
        the router's losses; they are still routed. With the "moe" recompute module the layer runs under
        megatron-core's ``tensor_parallel.checkpoint``: the forward keeps only ``hidden_states``, the backward
        runs the layer again (its all-to-alls included) and the router attaches its losses in that second run.
        """
        if self.recompute_layer and self.training and torch.is_grad_enabled():
            return tensor_parallel.checkpoint(functools.partial(self._forward, padding_mask=padding_mask), False,
                                              hidden_states)
        return self._forward(hidden_states, padding_mask)

    def _forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        seq, batch, hidden = hidden_states.shape
        sharing_tokens = self.tp_group is not None and not self.config.sequence_parallel
        if sharing_tokens and (seq * batch) % dist.get_world_size(self.tp_group):
            raise ParallelLayoutError(
                f"{seq * batch} tokens (--seq-length x --micro-batch-size) are not divisible by "
                f"--tensor-model-parallel-size {dist.get_world_size(self.tp_group)}"
            )
        x = hidden_states.reshape(seq * batch, hidden)
        valid = None if padding_mask is None else ~padding_mask.transpose(0, 1).reshape(-1)
        routing, self.stats = self.router(x, valid, sequence_shape=(seq, batch))
        if sharing_tokens:
            # Without sequence parallelism the tensor-parallel ranks hold the same tokens: each runs the
            # experts on its share, then the shares are gathered.
            size, rank = dist.get_world_size(self.tp_group), dist.get_rank(self.tp_group)
            start, stop = rank * x.shape[0] // size, (rank + 1) * x.shape[0] // size
            x, routing = split_tokens(x, start, stop, self.tp_group), slice_routing(routing, start, stop, self.tp_group)

        dispatcher = self.dispatcher
        state = dispatcher.token_dispatch(dispatcher.dispatch_preprocess(x, routing))
        shared = self._shared_experts(hidden_states)  # while the tokens travel
        expert_input = dispatcher.dispatch_postprocess(state)
        expert_output = self.experts(expert_input.x, expert_input.tokens_per_expert,
                                     gather_index=expert_input.gather_index, probs=expert_input.probs)
        state = dispatcher.token_combine(dispatcher.combine_preprocess(state, expert_output))
        output = dispatcher.combine_postprocess(state)

        if sharing_tokens:
            output = gather_tokens(output, self.tp_group)
        output = output.view(seq, batch, hidden)
        if shared is not None:
            output = output + shared.to(output.dtype)
        return output, None


    def _shared_experts(self, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
        if self.shared_experts is None:
            return None
        if self.recompute_shared_experts and self.training and torch.is_grad_enabled():
            return tensor_parallel.checkpoint(self.shared_experts, False, hidden_states)
        return self.shared_experts(hidden_states)


def recompute_selected(config, module: str) -> bool:
    """``module`` is among the config's selectively recomputed modules (``--recompute-modules``)."""
    return config.recompute_granularity == "selective" and module in (config.recompute_modules or [])


def _local_shared_experts():
    """megatron-core's shared-expert builder with its local (non Transformer Engine) linear layers, for a layer
    built without a spec."""
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend

    return get_moe_module_spec_for_backend(LocalSpecProvider(), num_experts=1).keywords["submodules"].shared_experts


def _default_pg_collection():
    """megatron-core's tensor-parallel group, what a shared expert built outside a model needs."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])


def _tensor_parallel_group(pg_collection):
    """The tensor-parallel group when it has more than one rank, else None."""
    if pg_collection is not None and getattr(pg_collection, "tp", None) is not None:
        group = pg_collection.tp
    elif parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_tensor_model_parallel_group()
    else:
        return None
    return group if dist.get_world_size(group) > 1 else None
