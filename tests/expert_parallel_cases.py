"""The expert-parallel tests' cases: configs, fixed-seed weights and inputs, the single-process reference, and
the worker that runs the layer distributed (any TP x EP, with nodes of ``ranks_per_node`` processes)."""

import torch

from granular_moe import GranularMoELayer
from helpers import moe_config

SEQ, BATCH, HIDDEN = 8, 2, 16
TOKENS = SEQ * BATCH


def case_config(case, ep=1, tp=1):
    return moe_config(
        case["granularity"],
        num_experts=4,
        topk=case.get("topk", 2),
        hidden=HIDDEN,
        ffn=64,
        expert_model_parallel_size=ep,
        tensor_model_parallel_size=tp,
        expert_tensor_parallel_size=1,
        sequence_parallel=case.get("sequence_parallel", False) and tp > 1,
        moe_expert_capacity_factor=case.get("capacity_factor"),
        moe_token_drop_policy=case.get("drop_policy", "probs"),
        moe_z_loss_coeff=case.get("z"),
        **{"moe_aux_loss_coeff": case.get("aux", 0.0), **case.get("routing", {})},
    )


def case_data(case, num_inputs):
    """Full weights and one (input, output projection) per data-parallel replica, from a fixed seed."""
    generator = torch.Generator().manual_seed(7 + case["granularity"])
    config = case_config(case)
    experts, hidden, expert_hidden = config.num_moe_experts, HIDDEN, config.moe_ffn_hidden_size

    def normal(*shape, scale=1.0):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale

    weights = {
        "router": normal(experts, hidden),
        "weight1": normal(experts, hidden, expert_hidden, scale=0.3),
        "weight2": normal(experts, expert_hidden, hidden, scale=0.3),
        "bias": normal(experts, scale=0.3).float(),
    }
    if config.moe_shared_expert_intermediate_size:
        shared = config.moe_shared_expert_intermediate_size
        weights.update(shared_fc1=normal(shared, hidden, scale=0.3), shared_fc2=normal(hidden, shared, scale=0.3),
                       shared_gate=normal(1, hidden))
    inputs = [(normal(SEQ, BATCH, hidden), normal(SEQ, BATCH, hidden)) for _ in range(num_inputs)]
    if "only_experts" in case:
        # every token's router logits favour these experts by ~100: all tokens go to them
        favoured = torch.full((experts,), -5.0, dtype=torch.float64)
        favoured[list(case["only_experts"])] = 5.0
        weights["router"][:, 0] = favoured
        for x, _ in inputs:
            x[..., 0] = 10.0
    return weights, inputs


def load_weights(layer, weights):
    ids = layer.experts.global_expert_ids
    with torch.no_grad():
        layer.router.weight.copy_(weights["router"])
        layer.experts.weight1.copy_(weights["weight1"][ids])
        layer.experts.weight2.copy_(weights["weight2"][ids])
        if getattr(layer.router, "expert_bias", None) is not None:
            layer.router.expert_bias.copy_(weights["bias"])
        if layer.shared_experts is not None:
            layer.shared_experts.linear_fc1.weight.copy_(weights["shared_fc1"])
            layer.shared_experts.linear_fc2.weight.copy_(weights["shared_fc2"])
            if layer.shared_experts.gate_weight is not None:
                layer.shared_experts.gate_weight.copy_(weights["shared_gate"])


def shared_grads(layer):
    """The shared expert's weight gradients by name (empty without one)."""
    if layer.shared_experts is None:
        return {}
    return {name: p.grad.clone() for name, p in layer.shared_experts.named_parameters()}


def single_process_reference(case, weights, x, projection):
    """The single-process layer on ``x``: output, gradients and routing statistics."""
    layer = GranularMoELayer(case_config(case), layer_number=1, router_type=case.get("router", "token_choice"))
    load_weights(layer, weights)
    x = x.clone().requires_grad_()
    out, _ = layer(x)
    (out * projection).sum().backward()
    return {
        "out": out.detach(),
        "x_grad": x.grad,
        "router_grad": layer.router.weight.grad,
        "weight1_grad": layer.experts.weight1.grad,
        "weight2_grad": layer.experts.weight2.grad,
        "dropped": int(layer.stats.dropped),
        "tokens_per_expert": layer.stats.tokens_per_expert,
        "z_loss": layer.stats.z_loss,
        "shared": shared_grads(layer),
    }


def distributed_worker(rank, world_size, tp, ep, cases, megatron_lm=False, ranks_per_node=None, flat=False):
    """Each rank: its share of the replica's input, the distributed layer, forward and backward.

    ``megatron_lm``: the groups come as in Megatron-LM's pretrain (megatron-core's own initialisation,
    then the plugin's decoder-block spec function), not from granular_moe.parallel. ``ranks_per_node``:
    processes standing for one node (None: all on one node); ``flat``: one all-to-all level across them.
    """
    import argparse

    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from granular_moe.megatron.megatron_lm import granular_moe_decoder_block_spec
    from granular_moe.parallel import destroy_model_parallel, initialize_model_parallel

    if megatron_lm:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=1
        )
        granular_moe_decoder_block_spec(argparse.Namespace(), case_config(cases[0], ep=ep, tp=tp), False)
    else:
        initialize_model_parallel(tensor=tp, expert=ep, ranks_per_node=ranks_per_node or world_size)
    tp_rank, replica = parallel_state.get_tensor_model_parallel_rank(), rank // tp
    results = []
    for case in cases:
        weights, inputs = case_data(case, world_size // tp)
        x, projection = inputs[replica]
        if case.get("sequence_parallel"):
            shard = slice(tp_rank * SEQ // tp, (tp_rank + 1) * SEQ // tp)
            x, projection = x[shard], projection[shard]
        layer = GranularMoELayer(
            case_config(case, ep=ep, tp=tp), layer_number=1, router_type=case.get("router", "token_choice"),
            flat_all_to_all=flat,
        )
        load_weights(layer, weights)
        x = x.clone().requires_grad_()
        clear_aux_losses_tracker()
        out, _ = layer(x)
        (out * projection).sum().backward()
        traffic = getattr(layer.dispatcher, "traffic", None)
        z_entry = get_moe_metrics_tracker().metrics.get("z_loss")
        tracked_z = None if z_entry is None else z_entry.values
        results.append(
            {
                "out": out.detach(),
                "x_grad": x.grad,
                "router_grad": layer.router.weight.grad,
                "weight1_grad": layer.experts.weight1.grad,
                "weight2_grad": layer.experts.weight2.grad,
                "expert_ids": layer.experts.global_expert_ids,
                "shared": shared_grads(layer),
                "dropped": int(layer.stats.dropped),
                "tokens_per_expert": layer.stats.tokens_per_expert,
                "traffic": None if traffic is None else traffic.as_dict(),
                "z_loss": layer.stats.z_loss,
                "tracked_z_loss": None if tracked_z is None else float(tracked_z[0]),  # before Megatron's sum
            }
        )
    destroy_model_parallel()
    return results


def layouts_worker(rank, world_size, layouts):
    """:func:`distributed_worker` for each ``(tp, ep, cases, megatron_lm, ranks_per_node, flat)`` in turn."""
    return [distributed_worker(rank, world_size, *layout) for layout in layouts]


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def routed_ranks(case, weights, x, num_local_experts):
    """Per token, the set of expert-parallel ranks its kept experts live on (from the reference routing)."""
    layer = GranularMoELayer(case_config(case), layer_number=1, router_type=case.get("router", "token_choice"))
    load_weights(layer, weights)
    with torch.no_grad():
        routing, _ = layer.router(x.reshape(-1, HIDDEN))
    offsets = routing.token_offsets.tolist()
    return [
        {int(e) // num_local_experts for e in routing.expert_index[offsets[t] : offsets[t + 1]]}
        for t in range(TOKENS)
    ]


def process_group_collection_worker(rank, world_size, case):
    """The layer given megatron-core's ``pg_collection`` with an expert-parallel group of every rank while the
    module-level groups (megatron-core's parallel state, DeepSpeed's) hold EP 1: the collection's group is used."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    from granular_moe.parallel import destroy_model_parallel, initialize_model_parallel

    initialize_model_parallel(expert=1)
    expert_parallel = dist.new_group(list(range(world_size)))
    replicas = [dist.new_group([r]) for r in range(world_size)]
    collection = ProcessGroupCollection(tp=parallel_state.get_tensor_model_parallel_group(), ep=expert_parallel,
                                        expt_dp=replicas[rank])
    weights, inputs = case_data(case, world_size)
    layer = GranularMoELayer(case_config(case, ep=world_size), layer_number=1, pg_collection=collection)
    load_weights(layer, weights)
    x, projection = inputs[rank]
    x = x.clone().requires_grad_()
    out, _ = layer(x)
    (out * projection).sum().backward()
    result = {"out": out.detach(), "x_grad": x.grad, "weight1_grad": layer.experts.weight1.grad,
              "expert_ids": layer.experts.global_expert_ids, "all_to_all": type(layer.dispatcher).__name__}
    destroy_model_parallel()
    return result
