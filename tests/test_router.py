"""Aux losses: values against the hand formulas, gradients reaching the router, Megatron's tracker and
loss scale, and the NaN check."""

import functools

import pytest
import torch
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, clear_aux_losses_tracker

import reference_moe as ref
from granular_moe import GranularMoELayer
from granular_moe.router import RouterLogitsError, check_router_logits
from helpers import moe_config

AUX, Z = 0.01, 1e-3


def layer_and_input(granularity=4, **overrides):
    torch.manual_seed(0)
    config = moe_config(granularity, **(dict(moe_aux_loss_coeff=AUX, moe_z_loss_coeff=Z) | overrides))
    layer = GranularMoELayer(config, layer_number=2)
    x = torch.randn(6, 2, config.hidden_size, dtype=torch.float64)
    return config, layer, x


def test_loss_values_match_hand_formulas():
    config, layer, x = layer_and_input()
    layer(x)
    logits = x.view(-1, config.hidden_size) @ layer.router.weight.t()
    expected = ref.switch_loss(torch.softmax(logits, -1), config.moe_router_topk)
    torch.testing.assert_close(layer.stats.load_balancing_loss, expected)
    torch.testing.assert_close(layer.stats.z_loss, ref.z_loss(logits))
    # Spelled out once more for one tiny case: 2 tokens, 2 experts, top-1.
    tiny = torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=torch.float64)
    p = torch.softmax(tiny, -1)
    expected_switch = 2 * (1.0 * p[:, 0].mean() + 0.0 * p[:, 1].mean())  # both tokens pick expert 0
    torch.testing.assert_close(ref.switch_loss(p, 1), expected_switch)
    expected_z = ((torch.log(torch.exp(tiny).sum(-1))) ** 2).mean()
    torch.testing.assert_close(ref.z_loss(tiny), expected_z)


@pytest.mark.parametrize("loss_scale", [1.0, 0.25])
def test_aux_and_z_gradients_reach_the_router(loss_scale):
    config, layer, x = layer_and_input()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(loss_scale, dtype=torch.float64))
    projection = torch.randn_like(x)
    out, _ = layer(x)
    (loss_scale * (out * projection)).sum().backward()

    weights = [
        p.detach().clone().requires_grad_() for p in (layer.router.weight, layer.experts.weight1, layer.experts.weight2)
    ]
    gates_fn = functools.partial(ref.token_choice_gates, topk=config.moe_router_topk)
    out_ref, logits, _ = ref.moe_forward(x.view(-1, config.hidden_size), *weights, gates_fn)
    main = (out_ref.view_as(x) * projection).sum()
    without_losses = torch.autograd.grad(loss_scale * main, weights[0], retain_graph=True)[0]
    total = main + AUX * ref.switch_loss(torch.softmax(logits, -1), config.moe_router_topk) + Z * ref.z_loss(logits)
    (loss_scale * total).backward()
    torch.testing.assert_close(layer.router.weight.grad, weights[0].grad, rtol=1e-10, atol=1e-12)
    # ...and the losses did change the router gradient.
    assert not torch.allclose(without_losses, weights[0].grad)


def test_eval_attaches_no_loss_but_still_reports_it():
    config, layer, x = layer_and_input()
    layer.eval()
    x.requires_grad_()
    out, _ = layer(x)
    out.sum().backward()
    weights = [
        p.detach().clone().requires_grad_() for p in (layer.router.weight, layer.experts.weight1, layer.experts.weight2)
    ]
    gates_fn = functools.partial(ref.token_choice_gates, topk=config.moe_router_topk)
    out_ref, logits, _ = ref.moe_forward(x.detach().view(-1, config.hidden_size), *weights, gates_fn)
    out_ref.sum().backward()
    torch.testing.assert_close(layer.router.weight.grad, weights[0].grad)
    torch.testing.assert_close(layer.stats.z_loss, ref.z_loss(logits.detach()))


def test_losses_go_to_megatrons_tracker_under_its_names():
    config, layer, x = layer_and_input()
    clear_aux_losses_tracker()
    layer(x)
    tracker = get_moe_metrics_tracker().metrics
    assert float(tracker["load_balancing_loss"].values[1]) == pytest.approx(float(layer.stats.load_balancing_loss))
    assert float(tracker["z_loss"].values[1]) == pytest.approx(float(layer.stats.z_loss))
    assert float(tracker["z_loss"].values[0]) == 0.0
    clear_aux_losses_tracker()


def test_load_balancing_none_reports_but_does_not_train():
    config, layer, x = layer_and_input(moe_router_load_balancing_type="none", moe_z_loss_coeff=None)
    out, _ = layer(x)
    out.sum().backward()
    grad_without = layer.router.weight.grad.clone()
    layer.router.weight.grad = None
    layer.eval()
    out, _ = layer(x)
    out.sum().backward()
    torch.testing.assert_close(layer.router.weight.grad, grad_without)
    assert layer.stats.load_balancing_loss > 0


def test_nan_logits_are_counted_on_the_device_and_raised_by_the_step_check():
    """The forward reads nothing back for the check; the per-step check names the first bad layer, then
    starts counting again."""
    config, second, x = layer_and_input()  # layer number 2
    first = GranularMoELayer(config, layer_number=1)
    check_router_logits([first, second], config.num_layers, "cpu")  # nothing seen yet: passes
    first(x)
    bad = x.clone()
    bad[3, 1, 5] = float("nan")
    bad[0, 0, 0] = float("inf")
    second(bad)
    second(bad)
    assert isinstance(second.router.nonfinite_tokens, torch.Tensor) and int(second.router.nonfinite_tokens) == 4
    with pytest.raises(RouterLogitsError, match=r"MoE layer 2 held NaN/Inf for 4 of the 24 tokens"):
        check_router_logits([first, second], config.num_layers, "cpu")
    second(bad)
    first(bad)  # layer 1 goes bad too: the first layer is the one named
    with pytest.raises(RouterLogitsError, match=r"MoE layer 1 held NaN/Inf for 2 of the 12 tokens"):
        check_router_logits([first, second], config.num_layers, "cpu")
    first(x)
    check_router_logits([first, second], config.num_layers, "cpu")  # counts started again
