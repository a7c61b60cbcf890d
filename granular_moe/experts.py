"""All local experts of a layer as one pair of 3-D weights."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from granular_moe.ops import kernels_for


def _expert_rng():
    """Megatron's expert-parallel RNG stream when seeded (each expert-parallel rank draws its own experts,
    expert-data-parallel replicas the same ones), else the default generator."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name

    tracker, name = get_cuda_rng_tracker(), get_expert_parallel_rng_tracker_name()
    return tracker.fork(name) if name in tracker.get_states() else contextlib.nullcontext()


class GroupedExperts(torch.nn.Module):
    """Experts ``first_expert .. first_expert + num_local_experts - 1`` of a layer: MLPs
    ``h -> expert_hidden -> h``.

    Parameters (the public layout checkpoint tools rely on):
    ``weight1 [num_local_experts, hidden, expert_hidden]`` (``2 * expert_hidden`` with a gated linear
    unit: activation input first, linear gate second) and ``weight2 [num_local_experts, expert_hidden,
    hidden]``. The buffer ``global_expert_ids`` (not saved) names the global experts this rank holds;
    checkpoints place them by it (:meth:`sharded_state_dict`), so they load at any expert-parallel size.
    """

    def __init__(self, config, num_local_experts: int, first_expert: int = 0, kernels: str = "auto",
                 expert_groups=None):
        super().__init__()
        self.config = config
        # the layer's ExpertParallelGroups (None: one process, or megatron-core's own groups alone)
        self.expert_groups = expert_groups
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
        if config.perform_initialization and device == "cpu" and torch.cuda.is_available():
            self._initialize_slice_of_all_experts(first_expert)
        elif config.perform_initialization:
            with _expert_rng():
                config.init_method(self.weight1)
                config.output_layer_init_method(self.weight2)
        for weight in (self.weight1, self.weight2):
            # Expert weights: gradients are reduced over the expert-data-parallel group only.
            weight.allreduce = False
        self.register_buffer(
            "global_expert_ids", torch.arange(first_expert, first_expert + num_local_experts, device=device),
            persistent=False,
        )

    @torch.no_grad()
    def _initialize_slice_of_all_experts(self, first_expert: int) -> None:
        """``--use-cpu-initialization`` on a GPU machine: Megatron's expert RNG stream forks CUDA generators
        only, and every expert-parallel rank's CPU generator holds the same state, so the layer's experts are
        all drawn on every rank and each rank keeps its own (the same weights at any expert-parallel size)."""
        config, total = self.config, self.config.num_moe_experts
        for weight, init in ((self.weight1, config.init_method), (self.weight2, config.output_layer_init_method)):
            every_expert = torch.empty(total, *weight.shape[1:], dtype=weight.dtype)
            init(every_expert)
            weight.copy_(every_expert[first_expert : first_expert + self.num_local_experts])

    def forward(
        self, x: torch.Tensor, tokens_per_expert: torch.Tensor, gather_index: Optional[torch.Tensor] = None,
        probs: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Expert outputs for expert-sorted rows (``x[gather_index]`` when ``gather_index`` is given), each row's
        activation scaled by its gate ``probs`` when given (kept in their own dtype, fp32 from the router).

        Under ``torch.autocast`` the experts compute in the autocast dtype, as ``torch.nn.Linear`` does.
        """
        weight1, weight2 = self.weight1, self.weight2
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            x, weight1, weight2 = x.to(dtype), weight1.to(dtype), weight2.to(dtype)
        ops = kernels_for(self.kernels, x.device)
        return ops.grouped_mlp(x, tokens_per_expert, weight1, weight2, self.activation, self.gated, gather_index, probs)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """Megatron distributed-checkpoint view: each weight is a shard of the layer's global
        ``[num_experts, ...]`` tensor at this rank's expert offset, so a checkpoint saved with one
        expert-parallel size loads with another."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        groups = self.expert_groups
        if groups is not None:
            replica = dist.get_group_rank(groups.expert_data_parallel, dist.get_rank())
        elif parallel_state.model_parallel_is_initialized():  # megatron-core's groups alone (EP 1)
            replica = parallel_state.get_expert_data_parallel_rank()
        else:
            replica = 0
        ep_size = self.config.num_moe_experts // self.num_local_experts
        ep_rank = int(self.global_expert_ids[0]) // self.num_local_experts
        expert_axis = (len(sharded_offsets), ep_rank, ep_size)
        return {
            prefix + name: ShardedTensor.from_rank_offsets(
                prefix + name,
                getattr(self, name),
                *sharded_offsets,
                expert_axis,
                replica_id=replica,
                prepend_axis_num=len(sharded_offsets),
            )
            for name in ("weight1", "weight2")
        }
