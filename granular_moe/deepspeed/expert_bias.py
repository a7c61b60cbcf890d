"""Aux-loss-free balancing under DeepSpeed: the expert-bias update megatron-core's ``finalize_model_grads`` makes in
Megatron jobs, once per optimizer step.

Each :class:`~granular_moe.deepspeed.GranularMoE` router with ``expert_bias=True`` counts, in its buffer
``local_tokens_per_expert``, the assignments of the micro-batches it routed in training since the last update.
:func:`update_expert_bias` sums those loads over the data-parallel ranks (DeepSpeed's data-parallel group: every rank
that routes tokens of the global batch) and moves each bias by ``bias_update_rate * sign(mean load - load)`` with
megatron-core's own ``get_updated_expert_bias``, the same on every rank, then clears the counts. Call it once per
optimizer step, after the step's last backward::

    engine.backward(loss)
    if engine.is_gradient_accumulation_boundary():
        update_expert_bias(engine)
    engine.step()
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def _biased_routers(model: torch.nn.Module) -> list:
    from granular_moe.deepspeed.layer import GranularMoE

    routers = []
    for module in model.modules():
        if isinstance(module, GranularMoE) and module.training:
            router = module.deepspeed_moe.router
            if getattr(router, "expert_bias", None) is not None:
                routers.append(router)
    return routers


@torch.no_grad()
def update_expert_bias(model: torch.nn.Module, group: Optional[dist.ProcessGroup] = None) -> int:
    """Update the expert bias of every training GranularMoE layer of ``model`` (a DeepSpeed engine or the module)
    from the loads counted since the last call, summed over ``group`` (default: DeepSpeed's data-parallel group).
    Collective over that group when a layer has a bias; returns the number of layers updated."""
    from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

    routers = _biased_routers(model)
    if not routers:
        return 0
    if group is None:
        from deepspeed.utils import groups as ds_groups

        group = ds_groups._get_data_parallel_group()
    rates = {router.config.moe_router_bias_update_rate for router in routers}
    for rate in rates:  # get_updated_expert_bias takes one rate
        chosen = [router for router in routers if router.config.moe_router_bias_update_rate == rate]
        by_size: dict = {}
        for router in chosen:  # layers of one expert count stack into one all-reduce
            by_size.setdefault(router.num_experts, []).append(router)
        for same in by_size.values():
            loads = torch.stack([router.local_tokens_per_expert for router in same])
            biases = torch.stack([router.expert_bias for router in same])
            updated = get_updated_expert_bias(loads, biases, rate, tp_dp_cp_group=group)
            for router, bias in zip(same, updated):
                router.expert_bias.copy_(bias)
                router.local_tokens_per_expert.zero_()
    return len(routers)
