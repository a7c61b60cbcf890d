"""Routing of today's fine-grained models against an independent fp64 reference (tests/reference_moe.py, written
from megatron-core's documented rules): score functions, pre-softmax, expert bias, group-limited top-k, the
scaling factor, each load-balancing loss, shared experts with and without their gate; output and the gradients
of the input, the router, the experts and the shared expert, for G in {1, 2, 4}."""

import functools

import pytest
import torch
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

import reference_moe as ref
from granular_moe import GranularMoELayer
from helpers import moe_config

SEQ, BATCH = 6, 3


def groups_for(granularity):
    """Group-limited routing with two chosen groups of four (one of two at G = 1)."""
    return dict(moe_router_num_groups=4 if granularity > 1 else 2, moe_router_group_topk=2 if granularity > 1 else 1)


OPTIONS = {
    "softmax": {},
    "pre-softmax": dict(moe_router_pre_softmax=True),
    "scaling": dict(moe_router_topk_scaling_factor=2.5),
    "sigmoid": dict(moe_router_score_function="sigmoid"),
    "sigmoid-bias": dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
    "sqrtsoftplus-bias": dict(moe_router_score_function="sqrtsoftplus", moe_router_enable_expert_bias=True),
    "grouped": "groups",
    "sigmoid-bias-grouped": dict(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                                 moe_router_topk_scaling_factor=1.5, groups=True),
}


def configure(granularity, option, **extra):
    settings = OPTIONS[option]
    settings = groups_for(granularity) if settings == "groups" else dict(settings)
    if settings.pop("groups", False):
        settings.update(groups_for(granularity))
    return moe_config(granularity, num_experts=4, topk=2, hidden=8, ffn=32, **settings, **extra)


def run(config, *, bias=None, steps=1, shared=False):
    """The layer (seeded), forward and backward of ``sum(out * projection)`` over ``steps`` micro-batches;
    returns the layer, its inputs and outputs."""
    torch.manual_seed(0)
    layer = GranularMoELayer(config, layer_number=1)
    if bias is not None:
        layer.router.expert_bias.copy_(bias)
    inputs, outputs = [], []
    for _ in range(steps):
        x = torch.randn(SEQ, BATCH, config.hidden_size, dtype=torch.float64, requires_grad=True)
        projection = torch.randn_like(x)
        out, _ = layer(x)
        (out * projection).sum().backward()
        inputs.append((x, projection))
        outputs.append(out.detach())
    return layer, inputs, outputs


def leaf(tensor):
    return tensor.detach().clone().requires_grad_()


def reference(layer, inputs, gates_fn, loss_fn=None):
    """The reference objective over the same inputs: ``sum(out * projection)`` plus the losses ``loss_fn``
    adds, backpropagated; returns outputs, the input gradients and the weights (with their gradients)."""
    config = layer.config
    weights = {name: leaf(p) for name, p in layer.named_parameters()}
    total, outputs, x_grads = 0.0, [], []
    logits_seen = []
    for x, projection in inputs:
        x_ref = leaf(x)
        flat = x_ref.reshape(-1, config.hidden_size)
        out, logits, _ = ref.moe_forward(flat, weights["router.weight"], weights["experts.weight1"],
                                         weights["experts.weight2"], gates_fn)
        if "shared_experts.linear_fc1.weight" in weights:
            out = out + ref.shared_expert(flat, weights["shared_experts.linear_fc1.weight"],
                                          weights["shared_experts.linear_fc2.weight"],
                                          gate_weight=weights.get("shared_experts.gate_weight"))
        out = out.reshape(x.shape)
        logits_seen.append(logits)
        total = total + (out * projection).sum()
        if loss_fn is not None:
            total = total + loss_fn(logits, logits_seen)
        outputs.append(out.detach())
        x_grads.append(x_ref)
    total.backward()
    return outputs, [x.grad for x in x_grads], weights


def assert_matches(layer, inputs, outputs, gates_fn, loss_fn=None):
    ref_outputs, ref_x_grads, weights = reference(layer, inputs, gates_fn, loss_fn)
    for got, expected in zip(outputs, ref_outputs):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for (x, _), expected in zip(inputs, ref_x_grads):
        torch.testing.assert_close(x.grad, expected, rtol=1e-9, atol=1e-12)
    for name, param in layer.named_parameters():
        torch.testing.assert_close(param.grad, weights[name].grad, rtol=1e-9, atol=1e-12, msg=name)


def gates_for(config, bias=None):
    return functools.partial(
        ref.scored_gates, topk=config.moe_router_topk, score=config.moe_router_score_function,
        pre_softmax=config.moe_router_pre_softmax, num_groups=config.moe_router_num_groups,
        group_topk=config.moe_router_group_topk, scaling=config.moe_router_topk_scaling_factor, bias=bias)


@pytest.mark.parametrize("granularity", [1, 2, 4])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_each_routing_option_matches_the_reference(granularity, option):
    config = configure(granularity, option)
    bias = None
    if config.moe_router_enable_expert_bias:
        bias = torch.randn(config.num_moe_experts, dtype=torch.float32, generator=torch.Generator().manual_seed(3))
        bias = bias * 0.5  # large enough to change which experts are chosen
    layer, inputs, outputs = run(config, bias=bias)
    assert_matches(layer, inputs, outputs, gates_for(config, None if bias is None else bias.double()))
    if bias is not None:  # the bias steers the choice: without it other experts are taken
        logits = layer.router.gate_logits(inputs[0][0].reshape(-1, config.hidden_size))
        plain, steered = gates_for(config)(logits), gates_for(config, bias.double())(logits)
        assert not torch.equal(plain != 0, steered != 0)


def test_top1_sigmoid_gates_are_the_raw_scores():
    config = moe_config(1, num_experts=4, topk=1, hidden=8, ffn=32, moe_router_score_function="sigmoid")
    layer, inputs, outputs = run(config)
    assert_matches(layer, inputs, outputs, gates_for(config))


def test_pre_softmax_gates_are_not_renormalised():
    """Megatron's meaning of --moe-router-pre-softmax with top-k > 1: the probabilities of the whole softmax."""
    config = configure(2, "pre-softmax")
    layer, inputs, _ = run(config)
    routing, _ = layer.router(inputs[0][0].detach().reshape(-1, config.hidden_size))
    sums = torch.zeros(SEQ * BATCH, dtype=torch.float64).index_add_(
        0, torch.repeat_interleave(torch.arange(SEQ * BATCH), routing.token_offsets.diff()), routing.weight.detach())
    assert (sums < 1 - 1e-3).all()


LOSSES = {
    "aux_loss": lambda logits, seen, k, score: ref.switch_loss(ref.balance_scores(logits, score), k),
    "seq_aux_loss": lambda logits, seen, k, score: ref.sequence_switch_loss(ref.balance_scores(logits, score), k,
                                                                            SEQ, BATCH),
}


@pytest.mark.parametrize("granularity", [1, 2, 4])
@pytest.mark.parametrize("kind", ["aux_loss", "seq_aux_loss"])
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_each_balance_loss_matches_the_reference(granularity, kind, score):
    coefficient = 0.3
    config = moe_config(granularity, num_experts=4, topk=2, hidden=8, ffn=32, moe_router_score_function=score,
                        moe_router_load_balancing_type=kind, moe_aux_loss_coeff=coefficient)
    layer, inputs, outputs = run(config)
    k = config.moe_router_topk

    def losses(logits, seen):
        return coefficient * LOSSES[kind](logits, seen, k, score)

    assert_matches(layer, inputs, outputs, gates_for(config), losses)
    recorded = get_moe_metrics_tracker().metrics[
        {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss"}[kind]].values[0]
    expected = LOSSES[kind](inputs[0][0].detach().reshape(-1, 8) @ layer.router.weight.detach().t(), None, k, score)
    torch.testing.assert_close(recorded.double(), expected.detach(), rtol=1e-6, atol=1e-7)  # the tracker is fp32


@pytest.mark.parametrize("granularity", [1, 4])
def test_global_balance_loss_uses_the_loads_of_the_step_so_far(granularity):
    """Two micro-batches of one step: the second's loss takes the mean of both micro-batches' loads."""
    config = moe_config(granularity, num_experts=4, topk=2, hidden=8, ffn=32,
                        moe_router_load_balancing_type=["global_aux_loss", "aux_loss"], moe_aux_loss_coeff=[0.4, 0.1])
    layer, inputs, outputs = run(config, steps=2)
    k, loads = config.moe_router_topk, []

    def plain_loads(scores):
        counts = torch.zeros(scores.shape[-1], dtype=scores.dtype)
        for row in scores.detach():
            for e in row.topk(k).indices:
                counts[e] += 1
        return counts

    def losses(logits, seen):
        scores = ref.balance_scores(logits)
        loads.append(plain_loads(scores))
        return 0.4 * ref.switch_loss(scores, k, loads=sum(loads) / len(loads)) + 0.1 * ref.switch_loss(scores, k)

    assert_matches(layer, inputs, outputs, gates_for(config), losses)
    layer.router.reset_global_aux_loss_tracker()  # what finalize_model_grads does after the step
    assert layer.router.ga_steps == 0 and not layer.router.global_tokens_per_expert.any()


@pytest.mark.parametrize("granularity", [1, 2, 4])
@pytest.mark.parametrize("gate", [False, True])
def test_shared_expert_adds_megatrons_shared_expert_mlp(gloo_world, granularity, gate):
    config = moe_config(granularity, num_experts=4, topk=2, hidden=8, ffn=32,
                        moe_shared_expert_intermediate_size=24, moe_shared_expert_gate=gate)
    layer, inputs, outputs = run(config, shared=True)
    assert type(layer.shared_experts).__name__ == "SharedExpertMLP"
    assert layer.shared_experts.linear_fc1.weight.shape == (24, 8)
    assert layer.shared_experts.linear_fc2.weight.shape == (8, 24)
    assert (layer.shared_experts.gate_weight is not None) == gate
    assert_matches(layer, inputs, outputs, gates_for(config))


def test_granularity_leaves_the_shared_expert_as_given(gloo_world):
    sizes = {g: moe_config(g, num_experts=4, topk=2, hidden=8, ffn=32, moe_shared_expert_intermediate_size=24)
             .moe_shared_expert_intermediate_size for g in (1, 4)}
    assert sizes == {1: 24, 4: 24}


def test_bias_steers_selection_only_and_counts_the_loads():
    config = configure(2, "sigmoid-bias")
    layer, inputs, _ = run(config, bias=torch.zeros(8))
    # the bias has no gradient and is fp32; the loads of the micro-batch wait for finalize_model_grads
    assert layer.router.expert_bias.dtype == torch.float32 and not layer.router.expert_bias.requires_grad
    assert layer.router.local_tokens_per_expert.sum() == SEQ * BATCH * config.moe_router_topk
    assert "router.expert_bias" in layer.state_dict() and "router.local_tokens_per_expert" not in layer.state_dict()
    layer.eval()
    with torch.no_grad():
        layer(inputs[0][0])
    assert layer.router.local_tokens_per_expert.sum() == SEQ * BATCH * config.moe_router_topk  # eval: not counted


def test_expert_choice_refuses_what_it_cannot_combine_with():
    from granular_moe.config import GranularMoEConfigError

    for overrides in (dict(moe_router_score_function="sigmoid"), dict(moe_aux_loss_coeff=0.1),
                      dict(moe_router_num_groups=2, moe_router_group_topk=1)):
        config = moe_config(1, num_experts=4, topk=2, hidden=8, ffn=32, **overrides)
        with pytest.raises(GranularMoEConfigError, match="expert_choice balances loads by construction"):
            GranularMoELayer(config, router_type="expert_choice")


def test_expert_choice_takes_the_scaling_factor_and_a_shared_expert(gloo_world):
    config = moe_config(2, num_experts=4, topk=2, hidden=8, ffn=32, moe_router_topk_scaling_factor=3.0,
                        moe_shared_expert_intermediate_size=16)
    torch.manual_seed(0)
    layer = GranularMoELayer(config, layer_number=1, router_type="expert_choice")
    x = torch.randn(SEQ, BATCH, 8, dtype=torch.float64)
    out, _ = layer(x)
    flat = x.reshape(-1, 8)
    gates = 3.0 * ref.expert_choice_gates(flat @ layer.router.weight.detach().t(), config.moe_router_topk)
    expected, _, _ = ref.moe_forward(flat, layer.router.weight.detach(), layer.experts.weight1.detach(),
                                     layer.experts.weight2.detach(), lambda logits: gates)
    expected = expected + ref.shared_expert(flat, layer.shared_experts.linear_fc1.weight.detach(),
                                            layer.shared_experts.linear_fc2.weight.detach())
    torch.testing.assert_close(out.reshape(-1, 8), expected, rtol=1e-10, atol=1e-12)


def test_reference_softmax_gates_are_megatrons(gloo_world):
    """The reference itself against megatron-core's own topk_routing_with_score_function (softmax, sigmoid with
    bias, groups, pre-softmax, scaling), so the layer is checked against megatron-core's numerics."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    logits = torch.randn(10, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    bias = torch.randn(16, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 0.3
    for settings in (dict(), dict(pre_softmax=True), dict(score="sigmoid", bias=bias),
                     dict(num_groups=4, group_topk=2), dict(score="sqrtsoftplus", scaling=2.0, bias=bias)):
        ours = ref.scored_gates(logits, 4, **settings)
        probs, _ = topk_routing_with_score_function(
            logits, 4, use_pre_softmax=settings.get("pre_softmax", False), num_groups=settings.get("num_groups"),
            group_topk=settings.get("group_topk"), scaling_factor=settings.get("scaling"),
            score_function=settings.get("score", "softmax"), expert_bias=settings.get("bias"))
        torch.testing.assert_close(ours, probs, rtol=1e-6, atol=1e-7, msg=str(settings))


def test_the_expert_bias_balances_a_skewed_router(gloo_world):
    """A router that sends almost every token to two experts: megatron-core's bias update (finalize_model_grads'
    own step, from the loads the router counted) halves the load imbalance within 80 steps, with no loss."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias, reset_model_temporary_tensors

    config = moe_config(2, num_experts=4, topk=1, hidden=8, ffn=32, moe_router_score_function="sigmoid",
                        moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.005)
    torch.manual_seed(0)
    layer = GranularMoELayer(config, layer_number=1)
    x = torch.randn(64, 4, 8, dtype=torch.float64) + 1.0
    with torch.no_grad():
        layer.router.weight[:2] += 1.0  # experts 0 and 1 score highest for nearly every token

    def imbalance():
        layer(x)  # a training forward (gradients on): the router counts its loads
        load = layer.stats.tokens_per_expert.double()
        return float(load.max() / load.mean())

    start = imbalance()
    reset_model_temporary_tensors(config, [layer])
    for _ in range(80):
        imbalance()
        _update_router_expert_bias([layer], config)
        reset_model_temporary_tensors(config, [layer])
    assert start > 3.0
    assert imbalance() <= start / 2, (start, imbalance())


PADDED = 2  # the last positions of every sequence are padding


def run_padded(config, steps=1):
    """:func:`run` with the last ``PADDED`` positions of every sequence marked as padding."""
    torch.manual_seed(0)
    layer = GranularMoELayer(config, layer_number=1)
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    padding[:, -PADDED:] = True
    inputs, outputs = [], []
    for _ in range(steps):
        x = torch.randn(SEQ, BATCH, config.hidden_size, dtype=torch.float64, requires_grad=True)
        projection = torch.randn_like(x)
        out, _ = layer(x, padding_mask=padding)
        (out * projection).sum().backward()
        inputs.append((x, projection))
        outputs.append(out.detach())
    return layer, inputs, outputs


def valid_logits(logits):
    """The ``[s, b]``-ordered logits of the tokens that are not padding."""
    return logits.reshape(SEQ, BATCH, -1)[: SEQ - PADDED].reshape(-1, logits.shape[-1])


@pytest.mark.parametrize("granularity", [1, 4])
@pytest.mark.parametrize("kind", ["aux_loss", "seq_aux_loss", "global_aux_loss"])
def test_padding_is_left_out_of_every_balance_loss(granularity, kind):
    """Padding tokens are routed (their outputs and gradients as any token's) but count for no balance loss: the
    loss value and every gradient equal the reference whose loss sees the unpadded tokens only."""
    coefficient, steps = 0.3, 2 if kind == "global_aux_loss" else 1
    config = moe_config(granularity, num_experts=4, topk=2, hidden=8, ffn=32, moe_router_load_balancing_type=kind,
                        moe_aux_loss_coeff=coefficient)
    layer, inputs, outputs = run_padded(config, steps)
    k, loads, values = config.moe_router_topk, [], []

    def losses(logits, seen):
        scores = ref.balance_scores(valid_logits(logits))
        if kind == "aux_loss":
            loss = ref.switch_loss(scores, k)
        elif kind == "seq_aux_loss":
            loss = ref.sequence_switch_loss(scores, k, SEQ - PADDED, BATCH)
        else:
            loads.append(torch.zeros(scores.shape[-1], dtype=scores.dtype).index_add_(
                0, scores.detach().topk(k).indices.reshape(-1), torch.ones(scores.shape[0] * k, dtype=scores.dtype)))
            loss = ref.switch_loss(scores, k, loads=sum(loads) / len(loads))
        values.append(loss.detach())
        return coefficient * loss

    assert_matches(layer, inputs, outputs, gates_for(config), losses)
    name = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
            "global_aux_loss": "global_load_balancing_loss"}[kind]
    recorded = get_moe_metrics_tracker().metrics[name].values[0]  # the micro-batches' sum (the tracker is fp32)
    torch.testing.assert_close(recorded.double(), sum(values), rtol=1e-6, atol=1e-7)


def test_expert_bias_loads_leave_out_dropped_and_padded_assignments():
    """The loads the expert bias is steered by are the kept assignments of tokens that are not padding: neither
    the capacity's drops nor the padding count."""
    config = configure(2, "sigmoid-bias", moe_expert_capacity_factor=0.6)
    layer, inputs, _ = run_padded(config)
    x = inputs[0][0].detach().reshape(-1, config.hidden_size)
    valid = torch.ones(SEQ, BATCH, dtype=torch.bool)
    valid[SEQ - PADDED:] = False
    valid = valid.reshape(-1)
    with torch.no_grad():
        routing, stats = layer.router(x)  # without autograd: not counted again
    token = torch.repeat_interleave(torch.arange(x.shape[0]), routing.token_offsets.diff())
    experts = config.num_moe_experts
    kept_valid = torch.bincount(routing.expert_index[valid[token]], minlength=experts)
    kept_all = torch.bincount(routing.expert_index, minlength=experts)
    routed_valid = int(valid.sum()) * config.moe_router_topk
    assert int(stats.dropped) > 0 and not torch.equal(kept_valid, kept_all)  # both kinds of exclusion matter here
    assert int(kept_valid.sum()) < routed_valid
    torch.testing.assert_close(layer.router.local_tokens_per_expert, kept_valid.float())
