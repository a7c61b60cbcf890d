"""What the layer keeps for the backward: constant in the granularity, no row of the model's width per routed
assignment (one process, and per rank under expert parallelism, flat and two-level)."""

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from granular_moe import GranularMoELayer
from granular_moe.memory import SavedForBackward
from helpers import moe_config

HIDDEN, FFN, TOKENS = 48, 4096, 32


def swiglu_config(granularity, **overrides):
    return moe_config(granularity, num_experts=8, topk=2, hidden=HIDDEN, ffn=FFN, dtype=torch.float32,
                      gated_linear_unit=True, activation_func=F.silu, moe_aux_loss_coeff=1e-2, **overrides)


def saved_by_forward(layer, x):
    with SavedForBackward(exclude=[x, *layer.parameters()]) as saved:
        out, _ = layer(x)
    out.sum().backward()  # what was kept is enough for the backward
    return saved


def model_wide_rows(saved):
    """Rows of the saved 2-D tensors as wide as the model."""
    return [t.shape[0] for t in saved.tensors if len(t.shape) == 2 and t.shape[1] == HIDDEN]


@pytest.mark.parametrize("kernels", ["torch"])
def test_bytes_per_token_do_not_grow_with_granularity(kernels):
    """fp32 SwiGLU experts, d_ff 64x the model width: at G 64 (512 experts, top-128) the layer keeps at most
    1.15x what it keeps at G 1: the first GEMM's output (2 k d_ff per token whatever G) dominates; the routing
    metadata grows with E G and k G but stays small beside it."""
    per_token = {}
    for granularity in (1, 64):
        torch.manual_seed(0)
        layer = GranularMoELayer(swiglu_config(granularity), layer_number=1, kernels=kernels)
        x = torch.randn(TOKENS, 1, HIDDEN, requires_grad=True)
        saved = saved_by_forward(layer, x)
        assignments = TOKENS * layer.config.moe_router_topk
        first_gemm_output = TOKENS * 2 * 2 * FFN * 4  # k_base 2, gated: 2 d_ff per assignment-row of d_ff / G
        assert max(t.nbytes for t in saved.tensors) == first_gemm_output
        assert model_wide_rows(saved) == [], "a row of the model's width is kept per assignment or token"
        assert saved.nbytes > first_gemm_output
        per_token[granularity] = saved.nbytes / TOKENS
        assert assignments == TOKENS * 2 * granularity
    assert per_token[64] <= 1.15 * per_token[1], per_token


def memory_worker(rank, world_size, layouts):
    """Per layout ``(ep, ranks_per_node)``: this rank's saved tensors, the de-duplicated rows it received (tokens
    of the whole group with an expert here) and the assignments its experts ran."""
    import torch.distributed as dist

    from granular_moe.parallel import destroy_model_parallel, initialize_model_parallel

    results = []
    for ep, ranks_per_node in layouts:
        initialize_model_parallel(expert=ep, ranks_per_node=ranks_per_node)
        torch.manual_seed(0)  # the same router on every rank
        config = moe_config(8, num_experts=4, topk=2, hidden=HIDDEN, ffn=512, dtype=torch.float64,
                            expert_model_parallel_size=ep)
        layer = GranularMoELayer(config, layer_number=1)
        torch.manual_seed(1 + rank)
        x = torch.randn(TOKENS, 1, HIDDEN, dtype=torch.float64, requires_grad=True)
        saved = saved_by_forward(layer, x)
        with torch.no_grad():
            routing, _ = layer.router(x.view(TOKENS, HIDDEN))
        local = config.num_moe_experts // ep
        destination = routing.expert_index // local
        token = torch.repeat_interleave(torch.arange(TOKENS), routing.token_offsets.diff())
        visits = torch.zeros(TOKENS, ep, dtype=torch.int64)
        visits[token, destination] = 1
        counts = torch.stack([visits.sum(0), torch.bincount(destination, minlength=ep)])  # [rows, assignments] x rank
        everyone = [torch.empty_like(counts) for _ in range(world_size)]
        dist.all_gather(everyone, counts)
        ep_rank = rank % ep
        peers = [r for r in range(world_size) if r // ep == rank // ep]  # this rank's expert-parallel group
        received = sum(int(everyone[p][0, ep_rank]) for p in peers)
        assignments = sum(int(everyone[p][1, ep_rank]) for p in peers)
        results.append(dict(shapes=[t.shape for t in saved.tensors], received=received, assignments=assignments,
                            fc1=config.moe_ffn_hidden_size))
        destroy_model_parallel()
    return results


def test_each_expert_parallel_rank_keeps_its_received_rows_once():
    """4 processes: EP 2 (flat, one node) and EP 4 as 2 nodes of 2 (two-level). On each rank the only saved
    tensor of the model's width is the received rows, one per (token, rank) pair however many of the token's
    G-fold assignments the rank's experts run; the first GEMM's output has one row per assignment."""
    results = run_distributed(memory_worker, 4, [(2, 4), (4, 2)])
    for layout in range(2):
        for rank in range(4):
            got = results[rank][layout]
            wide = [shape[0] for shape in got["shapes"] if len(shape) == 2 and shape[1] == HIDDEN]
            assert wide == [got["received"]], (layout, rank, got["shapes"])
            assert got["received"] < got["assignments"]  # G 8: several assignments per token and rank
            first_gemm = [shape for shape in got["shapes"] if len(shape) == 2 and shape[1] == got["fc1"]]
            assert first_gemm == [torch.Size([got["assignments"], got["fc1"]])]


@pytest.mark.parametrize("modules", [["moe"], ["moe_act"], ["shared_experts"], ["moe", "shared_experts"]])
def test_recompute_modules_equal_the_run_without_and_keep_less(gloo_world, modules):
    """megatron-core's selective recompute on the granular layer (one process, fp64, a gated shared expert, aux and
    z losses): the same output and gradients as without it, the losses recorded once, and the bytes kept: "moe"
    keeps nothing but the input, "shared_experts" less than without, "moe_act" as much as without (the experts
    recompute their activation anyway)."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    runs, weights = {}, None
    torch.manual_seed(0)
    x_data = torch.randn(TOKENS, 2, HIDDEN, dtype=torch.float64)
    for recompute in (None, modules):
        extra = {} if recompute is None else dict(recompute_granularity="selective", recompute_modules=recompute,
                                                  moe_grouped_gemm=True)
        config = moe_config(4, hidden=HIDDEN, ffn=256, moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3,
                            moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True, **extra)
        layer = GranularMoELayer(config, layer_number=1)
        weights = weights or layer.state_dict()
        layer.load_state_dict(weights)
        x = x_data.clone().requires_grad_()
        clear_aux_losses_tracker()
        saved = saved_by_forward(layer, x)
        tracked = {name: entry.values.clone() for name, entry in get_moe_metrics_tracker().metrics.items()}
        grads = [x.grad] + [p.grad for p in layer.parameters()]
        runs[recompute is None] = (saved.nbytes, tracked, grads, layer(x)[0].detach())
    (plain_bytes, plain_tracked, plain_grads, plain_out), (bytes_, tracked, grads, out) = runs[True], runs[False]
    torch.testing.assert_close(out, plain_out, rtol=0, atol=0)
    for got, want in zip(grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    assert tracked.keys() == plain_tracked.keys() == {"load_balancing_loss", "z_loss"}
    for name, values in tracked.items():
        torch.testing.assert_close(values, plain_tracked[name], rtol=1e-12, atol=0)
    if "moe" in modules:
        assert bytes_ == 0
    elif "shared_experts" in modules:
        assert 0 < bytes_ < plain_bytes
    else:
        assert bytes_ == plain_bytes
