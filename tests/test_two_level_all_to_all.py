"""Expert parallelism across nodes: gloo processes stand in for nodes (``ranks_per_node``). The two-level
all-to-all equals one process in fp64 (output and every gradient), sends one row per (token, destination
node) across nodes and forwards inside the node once per rank; node-limited routing caps the nodes a token
visits; zero-token ranks and nodes work; tensor parallelism composes with it."""

import pytest

from distributed import run_distributed
from expert_parallel_cases import (
    SEQ,
    TOKENS,
    case_config,
    case_data,
    close,
    layouts_worker,
    routed_ranks,
    single_process_reference,
)

NODE_LIMITED = dict(moe_router_num_groups=2, moe_router_group_topk=1)  # 2 nodes, each token on 1 of them
CASES = [
    dict(granularity=1),
    dict(granularity=8),
    dict(granularity=4, capacity_factor=0.5),
    dict(granularity=2, router="expert_choice", capacity_factor=0.5),
    dict(granularity=4, routing=NODE_LIMITED),
    dict(granularity=2, only_experts=range(4)),  # every token to node 0: node 1 gets nothing
    dict(granularity=2, topk=1, only_experts=(0, 1)),  # every token to rank 0: ranks 1-3 get nothing
    # sigmoid scores with an expert bias, group-limited, a gated shared expert running while tokens travel
    dict(granularity=4, z=1e-3, routing=dict(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=4,
        moe_router_group_topk=2, moe_router_topk_scaling_factor=1.5, moe_shared_expert_intermediate_size=24,
        moe_shared_expert_gate=True, moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2)),
]
CASE_IDS = ["G1", "G8", "capacity-drops", "expert-choice", "node-limited", "one-node", "one-rank", "deepseek-style"]


def check_equals_single_process(results, cases, ep):
    for index, case in enumerate(cases):
        weights, inputs = case_data(case, ep)
        references = [single_process_reference(case, weights, *inputs[r]) for r in range(ep)]
        for rank in range(ep):
            got, ref = results[rank][index], references[rank]
            close(got["out"], ref["out"])
            close(got["x_grad"], ref["x_grad"])
            assert got["dropped"] == ref["dropped"]
            ids = got["expert_ids"]
            close(got["weight1_grad"], sum(r["weight1_grad"] for r in references)[ids])
            close(got["weight2_grad"], sum(r["weight2_grad"] for r in references)[ids])
        close(sum(results[r][index]["router_grad"] for r in range(ep)), sum(r["router_grad"] for r in references))
        for name in references[0]["shared"]:
            close(sum(results[r][index]["shared"][name] for r in range(ep)), sum(r["shared"][name] for r in references))


def expected_rows(case, ep, ranks_per_node):
    """From the reference routing, per source rank: rows to other nodes and to this node's other ranks with
    one level (flat) and with two, and the rows the two-level forwarding inside nodes sends, summed over
    every rank (a forwarding rank carries other ranks' tokens)."""
    weights, inputs = case_data(case, ep)
    num_local = case_config(case).num_moe_experts // ep
    per_rank, forwarded = [], 0
    for source in range(ep):
        node, local = divmod(source, ranks_per_node)
        ranks_of_token = routed_ranks(case, weights, inputs[source][0], num_local)
        nodes_of_token = [{r // ranks_per_node for r in ranks} for ranks in ranks_of_token]
        per_rank.append({
            "nodes_visited": nodes_of_token,
            "two_level_inter": sum(len(nodes - {node}) for nodes in nodes_of_token),
            "flat_inter": sum(sum(r // ranks_per_node != node for r in ranks) for ranks in ranks_of_token),
            "flat_intra": sum(sum(r // ranks_per_node == node and r != source for r in ranks)
                              for ranks in ranks_of_token),
        })
        forwarded += sum(len({r for r in ranks if r // ranks_per_node == m} - {m * ranks_per_node + local})
                         for ranks in ranks_of_token for m in {r // ranks_per_node for r in ranks})
    return per_rank, forwarded


def test_two_nodes_of_two_ranks_equal_one_process_and_cross_once_per_node(gloo_world):
    ep, ranks_per_node = 4, 2
    counted = [1, 4]  # G8 and the node limit: traffic flat vs two-level
    layouts = [(1, ep, CASES, False, ranks_per_node, False),
               (1, ep, [CASES[i] for i in counted], False, ranks_per_node, True)]
    two_level, flat = zip(*run_distributed(layouts_worker, ep, layouts))
    check_equals_single_process(two_level, CASES, ep)
    check_equals_single_process(flat, [CASES[i] for i in counted], ep)

    for index, case in enumerate(CASES):
        expected, forwarded = expected_rows(case, ep, ranks_per_node)
        traffic = [two_level[rank][index]["traffic"] for rank in range(ep)]
        for rank in range(ep):
            # at most one row per (token, destination node) crosses: exactly the remote nodes each token visits
            assert traffic[rank]["inter_node_rows_sent"] == expected[rank]["two_level_inter"] <= TOKENS
        assert sum(t["intra_node_rows_sent"] for t in traffic) == forwarded
        if case.get("routing") is NODE_LIMITED:
            assert all(len(nodes) == 1 for e in expected for nodes in e["nodes_visited"])
        if "only_experts" in case:
            # nothing crosses from node 0; node 1's ranks send every token across once
            assert [t["inter_node_rows_sent"] for t in traffic] == [0, 0, TOKENS, TOKENS]
    for position, index in enumerate(counted):
        expected, _ = expected_rows(CASES[index], ep, ranks_per_node)
        for rank in range(ep):
            got = flat[rank][position]["traffic"]
            assert got["inter_node_rows_sent"] == expected[rank]["flat_inter"]
            assert got["intra_node_rows_sent"] == expected[rank]["flat_intra"]
            assert two_level[rank][index]["traffic"]["inter_node_rows_sent"] <= got["inter_node_rows_sent"]
    # G8 (top-16 of 32 experts): a token visits both nodes' ranks; flat sends it to each remote rank
    g8 = [(two_level[r][1]["traffic"]["inter_node_rows_sent"], flat[r][0]["traffic"]["inter_node_rows_sent"])
          for r in range(ep)]
    assert all(two <= TOKENS < flat_rows for two, flat_rows in g8), g8


TP_CASES = [
    dict(granularity=4, capacity_factor=0.75),
    dict(granularity=4, z=1e-3, sequence_parallel=True, routing=dict(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True, moe_router_num_groups=2,
        moe_router_group_topk=1, moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=1e-2)),
]
FOUR_NODE_CASES = [dict(granularity=8),
                   dict(granularity=8, routing=dict(moe_router_num_groups=4, moe_router_group_topk=2))]


@pytest.mark.parametrize("world", [8])
def test_tensor_parallel_and_four_nodes_compose_with_two_levels(gloo_world, world):
    """8 processes: TP 2 x EP 4 over 2 nodes of 4 (an EP group spans 2 nodes of 2 of its ranks), then EP 8
    over 4 nodes of 2."""
    layouts = [(2, 4, TP_CASES, False, 4, False), (1, 8, FOUR_NODE_CASES, False, 2, False)]
    tensor_parallel, four_nodes = zip(*run_distributed(layouts_worker, world, layouts))
    tp = 2
    for index, case in enumerate(TP_CASES):
        weights, inputs = case_data(case, world // tp)
        reference_case = dict(case, sequence_parallel=False)
        references = [single_process_reference(reference_case, weights, *inputs[d]) for d in range(world // tp)]
        for rank in range(world):
            got, ref = tensor_parallel[rank][index], references[rank // tp]
            rows = slice(None)
            if case.get("sequence_parallel"):
                rows = slice(rank % tp * SEQ // tp, (rank % tp + 1) * SEQ // tp)
            close(got["out"], ref["out"][rows])
            close(got["x_grad"], ref["x_grad"][rows])
            # EP group 0 (ranks 0-3) holds replicas 0 and 1 (2 TP ranks each): their expert gradients summed
            replicas = references[rank // 4 * 2 : rank // 4 * 2 + 2]
            ids = got["expert_ids"]
            close(got["weight1_grad"], sum(r["weight1_grad"] for r in replicas)[ids])
            close(got["weight2_grad"], sum(r["weight2_grad"] for r in replicas)[ids])
            assert got["traffic"]["inter_node_rows_sent"] <= TOKENS // tp  # each TP rank dispatches half the tokens
        for replica in range(world // tp):
            router_grads = [tensor_parallel[replica * tp + j][index]["router_grad"] for j in range(tp)]
            if case.get("sequence_parallel"):  # each TP rank routes its sequence shard
                close(sum(router_grads), references[replica]["router_grad"])
            else:  # each routes every token; the gate gradients are summed over the TP ranks
                for grad in router_grads:
                    close(grad, references[replica]["router_grad"])

    check_equals_single_process(four_nodes, FOUR_NODE_CASES, 8)
    expected, _ = expected_rows(FOUR_NODE_CASES[1], 8, 2)
    for rank in range(8):
        assert all(len(nodes) <= 2 for nodes in expected[rank]["nodes_visited"])  # node limit M = 2
        assert four_nodes[rank][1]["traffic"]["inter_node_rows_sent"] == expected[rank]["two_level_inter"]
        assert expected[rank]["two_level_inter"] <= TOKENS * 2
