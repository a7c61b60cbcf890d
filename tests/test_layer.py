"""GranularMoELayer against the independent dense fp64 reference: forward and every gradient."""

import functools

import pytest
import torch
import torch.nn.functional as F

import reference_moe as ref
from granular_moe import GranularMoELayer
from helpers import moe_config

SEQ, BATCH = 8, 3


def run_layer_and_reference(config, router_type, seed=0):
    torch.manual_seed(seed)
    layer = GranularMoELayer(config, layer_number=1, router_type=router_type)
    x = torch.randn(SEQ, BATCH, config.hidden_size, dtype=torch.float64, requires_grad=True)
    projection = torch.randn_like(x)
    out, bias = layer(x)
    assert bias is None and out.shape == x.shape
    (out * projection).sum().backward()

    weights = [
        p.detach().clone().requires_grad_() for p in (layer.router.weight, layer.experts.weight1, layer.experts.weight2)
    ]
    x_ref = x.detach().clone().requires_grad_()
    if router_type == "token_choice":
        gates_fn = functools.partial(
            ref.token_choice_gates,
            topk=config.moe_router_topk,
            capacity_factor=config.moe_expert_capacity_factor,
            drop_policy=config.moe_token_drop_policy,
        )
    else:
        gates_fn = functools.partial(
            ref.expert_choice_gates, topk=config.moe_router_topk, capacity_factor=config.moe_expert_capacity_factor
        )
    out_ref, logits, gates = ref.moe_forward(
        x_ref.view(-1, config.hidden_size), *weights, gates_fn,
        activation=config.activation_func, gated=config.gated_linear_unit,
    )
    (out_ref.view_as(x) * projection).sum().backward()

    torch.testing.assert_close(out, out_ref.view_as(x), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    for param, weight in zip((layer.router.weight, layer.experts.weight1, layer.experts.weight2), weights):
        torch.testing.assert_close(param.grad, weight.grad, rtol=1e-10, atol=1e-12)
    return layer, out, gates, logits


@pytest.mark.parametrize("granularity", [1, 2, 4, 16, 64])
@pytest.mark.parametrize("router_type", ["token_choice", "expert_choice"])
def test_dropless_matches_reference(granularity, router_type):
    config = moe_config(granularity, moe_aux_loss_coeff=0.0)
    layer, _, gates, _ = run_layer_and_reference(config, router_type)
    assert layer.experts.weight1.shape == (4 * granularity, 16, 64 // granularity)
    if router_type == "token_choice":
        assert int(layer.stats.dropped) == 0
        assert (gates != 0).sum(dim=-1).eq(2 * granularity).all()


def test_top1_keeps_raw_probability():
    config = moe_config(1, topk=1)
    layer, _, gates, logits = run_layer_and_reference(config, "token_choice")
    chosen = gates.sum(dim=-1)
    torch.testing.assert_close(chosen, torch.softmax(logits, -1).max(dim=-1).values)
    assert (chosen < 1).all()


def test_gated_silu_experts_match_reference():
    config = moe_config(4, gated_linear_unit=True, activation_func=F.silu)
    layer, *_ = run_layer_and_reference(config, "token_choice")
    assert layer.experts.weight1.shape == (16, 16, 2 * 16)


@pytest.mark.parametrize("granularity", [1, 4, 16, 64])
@pytest.mark.parametrize("drop_policy", ["probs", "position"])
def test_capacity_drops_match_reference(granularity, drop_policy):
    config = moe_config(granularity, moe_expert_capacity_factor=0.5, moe_token_drop_policy=drop_policy)
    layer, out, gates, logits = run_layer_and_reference(config, "token_choice")
    routed = torch.softmax(logits, -1).topk(config.moe_router_topk, dim=-1).indices.numel()
    kept = int((gates != 0).sum())
    assert int(layer.stats.dropped) == routed - kept > 0
    capacity = -(-SEQ * BATCH * config.moe_router_topk // (2 * config.num_moe_experts))
    assert int(layer.stats.tokens_per_expert.max()) <= capacity
    torch.testing.assert_close(layer.stats.tokens_per_expert, (gates != 0).sum(dim=0))


def test_fully_dropped_tokens_output_zero_and_are_counted():
    config = moe_config(1, topk=1, moe_expert_capacity_factor=0.25)
    layer, out, gates, _ = run_layer_and_reference(config, "token_choice")
    unrouted = gates.abs().sum(dim=-1) == 0
    assert unrouted.any()
    assert int(layer.stats.unrouted_tokens) == int(unrouted.sum())
    assert out.view(-1, config.hidden_size)[unrouted].abs().max() == 0


@pytest.mark.parametrize("capacity_factor", [0.5, 2.0])
def test_expert_choice_capacity_matches_reference(capacity_factor):
    config = moe_config(4, moe_expert_capacity_factor=capacity_factor)
    layer, _, gates, _ = run_layer_and_reference(config, "expert_choice")
    capacity = min(SEQ * BATCH, -(-SEQ * BATCH * config.moe_router_topk * capacity_factor // config.num_moe_experts))
    assert layer.stats.tokens_per_expert.eq(int(capacity)).all()
    assert int(layer.stats.unrouted_tokens) == int((gates.sum(dim=-1) == 0).sum())


def test_padding_is_routed_but_left_out_of_the_losses():
    config = moe_config(2, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3)
    layer = GranularMoELayer(config, layer_number=1)
    x = torch.randn(SEQ, BATCH, config.hidden_size, dtype=torch.float64)
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    padding[:, -3:] = True
    out_masked, _ = layer(x, padding_mask=padding)
    masked_z = layer.stats.z_loss
    out_plain, _ = layer(x)
    torch.testing.assert_close(out_masked, out_plain)
    valid_logits = (x[:-3].reshape(-1, config.hidden_size) @ layer.router.weight.t())
    torch.testing.assert_close(masked_z, ref.z_loss(valid_logits))
    assert not torch.allclose(masked_z, layer.stats.z_loss)


def test_a_micro_batch_of_padding_only_gives_zero_losses_and_finite_gradients():
    config = moe_config(2, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3)
    layer = GranularMoELayer(config, layer_number=1)
    x = torch.randn(SEQ, BATCH, config.hidden_size, dtype=torch.float64, requires_grad=True)
    out, _ = layer(x, padding_mask=torch.ones(BATCH, SEQ, dtype=torch.bool))
    out.sum().backward()
    assert float(layer.stats.load_balancing_loss) == 0.0 and float(layer.stats.z_loss) == 0.0
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.router.weight.grad).all()


def test_the_router_stays_in_fp32_under_autocast():
    config = moe_config(4, dtype=torch.float32)
    torch.manual_seed(0)
    layer = GranularMoELayer(config, layer_number=1)
    x = torch.randn(SEQ * BATCH, config.hidden_size)
    plain, _ = layer.router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = layer.router(x)
    assert mixed.weight.dtype == torch.float32
    assert torch.equal(mixed.expert_index, plain.expert_index) and torch.equal(mixed.weight, plain.weight)


def test_experts_compute_in_the_autocast_dtype():
    config = moe_config(4, dtype=torch.float32)
    torch.manual_seed(0)
    layer = GranularMoELayer(config, layer_number=1)
    x = torch.randn(SEQ, BATCH, config.hidden_size)
    full, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = layer(x)
    assert mixed.dtype == torch.bfloat16 and layer.experts.weight1.dtype == torch.float32
    torch.testing.assert_close(mixed.float(), full, rtol=3e-2, atol=3e-2)
    assert not torch.equal(mixed.float(), full)
