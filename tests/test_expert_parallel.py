"""Expert parallelism on gloo processes equals the single-process layer in fp64, and the all-to-all
sends one row per (token, rank)."""


import pytest
import torch

from distributed import run_distributed
from expert_parallel_cases import (
    HIDDEN,
    SEQ,
    TOKENS,
    case_config,
    case_data,
    close,
    distributed_worker,
    load_weights,
    process_group_collection_worker,
    routed_ranks,
    single_process_reference,
)
from granular_moe import GranularMoELayer

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



def test_the_layer_takes_its_expert_group_from_megatrons_process_group_collection():
    """megatron-core 0.19 passes process groups explicitly: an expert-parallel group in the layer's
    ``pg_collection`` spreads the experts over its ranks even where the module-level groups say EP 1, and the
    result equals one process."""
    case = dict(granularity=4)
    results = run_distributed(process_group_collection_worker, 2, case)
    weights, inputs = case_data(case, 2)
    references = [single_process_reference(case, weights, *inputs[r]) for r in range(2)]
    weight1_grad = sum(ref["weight1_grad"] for ref in references)
    for rank in range(2):
        got = results[rank]
        assert got["all_to_all"] == "AllToAllDispatcher" and len(got["expert_ids"]) == 8
        close(got["out"], references[rank]["out"])
        close(got["x_grad"], references[rank]["x_grad"])
        close(got["weight1_grad"], weight1_grad[got["expert_ids"]])
