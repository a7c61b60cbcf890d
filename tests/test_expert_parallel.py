"""Expert parallelism on gloo processes equals the single-process layer in fp64, and the all-to-all
sends one row per (token, rank)."""


import pytest
import torch

from distributed import run_distributed
from granular_moe import GranularMoELayer
from helpers import moe_config

SEQ, BATCH, HIDDEN = 8, 2, 16
TOKENS = SEQ * BATCH


def case_config(case, ep=1, tp=1):
    return moe_config(
        case["granularity"],
        num_experts=4,
        topk=2,
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


def distributed_worker(rank, world_size, tp, ep, cases, megatron_lm=False):
    """Each rank: its share of the replica's input, the distributed layer, forward and backward.

    ``megatron_lm``: the groups come as in Megatron-LM's pretrain (megatron-core's own initialisation,
    then the plugin's decoder-block spec function), not from granular_moe.parallel.
    """
    import argparse

    from megatron.core import parallel_state
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from granular_moe.megatron.megatron_lm import granular_moe_decoder_block_spec
    from granular_moe.parallel import initialize_model_parallel

    if megatron_lm:
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=1
        )
        granular_moe_decoder_block_spec(argparse.Namespace(), case_config(cases[0], ep=ep, tp=tp), False)
    else:
        initialize_model_parallel(tensor=tp, expert=ep)
    tp_rank, replica = parallel_state.get_tensor_model_parallel_rank(), rank // tp
    results = []
    for case in cases:
        weights, inputs = case_data(case, world_size // tp)
        x, projection = inputs[replica]
        if case.get("sequence_parallel"):
            shard = slice(tp_rank * SEQ // tp, (tp_rank + 1) * SEQ // tp)
            x, projection = x[shard], projection[shard]
        layer = GranularMoELayer(
            case_config(case, ep=ep, tp=tp), layer_number=1, router_type=case.get("router", "token_choice")
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
                "traffic": None if traffic is None else vars(traffic),
                "z_loss": layer.stats.z_loss,
                "tracked_z_loss": None if tracked_z is None else float(tracked_z[0]),  # before Megatron's sum
            }
        )
    return results


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def routed_ranks(case, weights, x, num_local_experts):
    """Per token, the set of expert-parallel ranks its kept experts live on (from the reference routing)."""
    layer = GranularMoELayer(case_config(case), layer_number=1)
    load_weights(layer, weights)
    with torch.no_grad():
        layer(x)
    routing, _ = layer.router(x.reshape(-1, HIDDEN))
    offsets = routing.token_offsets.tolist()
    return [
        {int(e) // num_local_experts for e in routing.expert_index[offsets[t] : offsets[t + 1]]}
        for t in range(TOKENS)
    ]


EP_CASES = [
    dict(granularity=1),
    dict(granularity=8),
    dict(granularity=4, capacity_factor=0.5),
    dict(granularity=4, capacity_factor=0.75, drop_policy="position"),
    dict(granularity=2, router="expert_choice", capacity_factor=0.5),
    dict(granularity=4, aux=1e-2, z=1e-3),
    # today's fine-grained models: sigmoid scores steered by an expert bias, group-limited, a gated shared expert
    dict(granularity=4, z=1e-3, routing=dict(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=4,
        moe_router_group_topk=2, moe_router_topk_scaling_factor=1.5, moe_shared_expert_intermediate_size=24,
        moe_shared_expert_gate=True, moe_router_load_balancing_type=["seq_aux_loss", "aux_loss"],
        moe_aux_loss_coeff=[1e-2, 1e-3])),
]


@pytest.mark.parametrize("ep, megatron_lm", [(2, False), (4, False), (2, True)], ids=["ep2", "ep4", "ep2-megatron-lm"])
def test_expert_parallel_equals_single_process(gloo_world, ep, megatron_lm):
    """megatron_lm: groups initialised as Megatron-LM's pretrain does, then joined by the plugin's spec."""
    cases = EP_CASES[:2] if megatron_lm else EP_CASES
    results = run_distributed(distributed_worker, ep, 1, ep, cases, megatron_lm)
    for index, case in enumerate(cases):
        weights, inputs = case_data(case, ep)
        references = [single_process_reference(case, weights, *inputs[r]) for r in range(ep)]
        router_grad = sum(ref["router_grad"] for ref in references)
        weight1_grad = sum(ref["weight1_grad"] for ref in references)
        weight2_grad = sum(ref["weight2_grad"] for ref in references)
        for rank in range(ep):
            got, ref = results[rank][index], references[rank]
            close(got["out"], ref["out"])
            close(got["x_grad"], ref["x_grad"])
            assert got["dropped"] == ref["dropped"]
            torch.testing.assert_close(got["tokens_per_expert"], ref["tokens_per_expert"])
            ids = got["expert_ids"]
            close(got["weight1_grad"], weight1_grad[ids])
            close(got["weight2_grad"], weight2_grad[ids])
        close(sum(results[r][index]["router_grad"] for r in range(ep)), router_grad)
        for name in references[0]["shared"]:  # replicated over expert parallelism, like the router
            expected = sum(ref["shared"][name] for ref in references)
            close(sum(results[r][index]["shared"][name] for r in range(ep)), expected)
        if case.get("capacity_factor") and case.get("router") != "expert_choice":
            assert sum(results[r][index]["dropped"] for r in range(ep)) > 0


@pytest.mark.parametrize("granularity", [1, 8])
def test_all_to_all_sends_one_row_per_token_and_rank(granularity):
    ep, case = 4, dict(granularity=granularity)
    results = run_distributed(distributed_worker, ep, 1, ep, [case])
    weights, inputs = case_data(case, ep)
    config = case_config(case)
    num_local, topk = config.num_moe_experts // ep, config.moe_router_topk
    for rank in range(ep):
        traffic = results[rank][0]["traffic"]
        ranks_per_token = routed_ranks(case, weights, inputs[rank][0], num_local)
        expected_rows = sum(len(ranks) for ranks in ranks_per_token)
        remote_rows = sum(len(ranks - {rank}) for ranks in ranks_per_token)
        assert traffic["rows_sent"] == expected_rows <= TOKENS * min(topk, ep)
        assert traffic["remote_rows_sent"] == remote_rows
        assert traffic["assignments"] == TOKENS * topk  # what a non-deduplicating dispatcher sends
        # fp64 rows + one int64 size per row; per assignment an fp64 gate and an int64 expert id
        layer = GranularMoELayer(config, layer_number=1)
        load_weights(layer, weights)
        routing, _ = layer.router(inputs[rank][0].reshape(-1, HIDDEN))
        remote_assignments = int(((routing.expert_index // num_local) != rank).sum())
        assert traffic["remote_bytes_sent"] == remote_rows * (HIDDEN * 8 + 8) + remote_assignments * 16
    if granularity == 8:
        assert all(r[0]["traffic"]["rows_sent"] <= TOKENS * ep < TOKENS * topk for r in results)


TP_CASES = [
    dict(granularity=4, capacity_factor=0.75),
    dict(granularity=2, router="expert_choice"),
    dict(granularity=4, aux=1e-2, z=1e-3),
    dict(granularity=4, aux=1e-2, z=1e-3, sequence_parallel=True),
    dict(granularity=4, z=1e-3, sequence_parallel=True, routing=dict(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=4,
        moe_router_group_topk=2, moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2)),
]


def test_tensor_and_expert_parallel_equal_single_process(gloo_world):
    tp, ep, world = 2, 2, 4
    results = run_distributed(distributed_worker, world, tp, ep, TP_CASES)
    for index, case in enumerate(TP_CASES):
        weights, inputs = case_data(case, world // tp)
        reference_case = dict(case, sequence_parallel=False)
        references = [single_process_reference(reference_case, weights, *inputs[d]) for d in range(world // tp)]
        for rank in range(world):
            got, ref = results[rank][index], references[rank // tp]
            tp_rank = rank % tp
            if case.get("sequence_parallel"):
                shard = slice(tp_rank * SEQ // tp, (tp_rank + 1) * SEQ // tp)
                close(got["out"], ref["out"][shard])
                close(got["x_grad"], ref["x_grad"][shard])
            else:
                close(got["out"], ref["out"])
                close(got["x_grad"], ref["x_grad"])
                close(got["router_grad"], ref["router_grad"])
            ids = got["expert_ids"]
            close(got["weight1_grad"], ref["weight1_grad"][ids])
            close(got["weight2_grad"], ref["weight2_grad"][ids])
        if case.get("sequence_parallel"):
            for replica in range(world // tp):
                summed = sum(results[replica * tp + j][index]["router_grad"] for j in range(tp))
                close(summed, references[replica]["router_grad"])
                # Megatron's log sums the z-loss record over the sequence shards: the whole batch's mean
                tracked = sum(results[replica * tp + j][index]["tracked_z_loss"] for j in range(tp))
                assert tracked == pytest.approx(float(references[replica]["z_loss"]), rel=1e-6)  # fp32 tracker

