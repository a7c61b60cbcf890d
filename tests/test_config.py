"""Granularity arithmetic, and every invalid configuration raising its named error."""

import pytest
from megatron.core.transformer.transformer_config import TransformerConfig

from granular_moe import GranularMoELayer
from granular_moe.config import GranularMoEConfigError, apply_granularity, granular_shape
from granular_moe.megatron import granular_moe_spec
from helpers import moe_config


@pytest.mark.parametrize("granularity", [1, 2, 4, 8, 64])
def test_granularity_keeps_active_parameters(granularity):
    shape = granular_shape(num_experts=8, topk=2, ffn_hidden_size=8192, granularity=granularity)
    assert (shape.num_experts, shape.topk, shape.expert_hidden_size) == (
        8 * granularity,
        2 * granularity,
        8192 // granularity,
    )
    assert shape.topk * shape.expert_hidden_size == 2 * 8192  # active expert width per token
    assert shape.num_experts * shape.expert_hidden_size == 8 * 8192  # total expert width


def test_moe_ffn_hidden_size_is_divided_when_given():
    shape = granular_shape(num_experts=8, topk=1, ffn_hidden_size=8192, moe_ffn_hidden_size=1024, granularity=4)
    assert shape.expert_hidden_size == 256


def test_apply_granularity_to_a_transformer_config():
    config = moe_config(8, num_experts=4, topk=2, ffn=64, expert_model_parallel_size=2)
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (32, 16, 8)
    assert config.ffn_hidden_size == 64  # dense layers keep their size


def test_apply_granularity_names_the_expert_size_flag_the_job_set():
    with pytest.raises(GranularMoEConfigError, match="does not divide --ffn-hidden-size 64"):
        moe_config(3, ffn=64)  # megatron-core copied --ffn-hidden-size into moe_ffn_hidden_size
    with pytest.raises(GranularMoEConfigError, match="does not divide --moe-ffn-hidden-size 48"):
        moe_config(32, ffn=64, moe_ffn_hidden_size=48)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(granularity=3),
            r"--moe-granularity 3 does not divide --ffn-hidden-size 64; valid values: 1, 2, 4, 8, 16, 32, 64",
        ),
        (dict(granularity=0), r"--moe-granularity must be an integer >= 1, got 0"),
        (dict(granularity=1.5), r"--moe-granularity must be an integer >= 1, got 1.5"),
        (dict(topk=5), r"--moe-router-topk 5 is above --num-experts 4 .*valid values: 1..4"),
        (
            dict(expert_model_parallel_size=3, granularity=2),
            r"--num-experts 4 x --moe-granularity 2 = 8 experts are not divisible by "
            r"--expert-model-parallel-size 3; valid values: 1, 2, 4, 8",
        ),
        (
            dict(moe_ffn_hidden_size=48, granularity=32),
            r"--moe-granularity 32 does not divide --moe-ffn-hidden-size 48",
        ),
        (dict(num_experts=0), r"--num-experts must be an integer >= 1"),
    ],
)
def test_invalid_shapes_name_the_flag(kwargs, message):
    args = dict(num_experts=4, topk=2, ffn_hidden_size=64, granularity=1) | kwargs
    with pytest.raises(GranularMoEConfigError, match=message):
        granular_shape(**args)


def test_apply_granularity_needs_an_moe_model():
    dense = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, use_cpu_initialization=True)
    with pytest.raises(GranularMoEConfigError, match="set --num-experts"):
        apply_granularity(dense, 2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(add_bias_linear=True), "--disable-bias-linear is required"),
        (dict(moe_shared_expert_intermediate_size=16, moe_shared_expert_overlap=True),
         "--moe-shared-expert-overlap is not supported"),
        (dict(context_parallel_size=2), "--context-parallel-size must be 1"),
        (dict(moe_router_force_load_balancing=True), "--moe-router-force-load-balancing is not supported"),
        (dict(moe_apply_probs_on_input=True, topk=1), "--moe-apply-probs-on-input is not supported"),
        (dict(moe_router_load_balancing_type="sinkhorn"),
         "--moe-router-load-balancing-type 'sinkhorn' is not supported by the granular layer; valid values: aux_loss, "
         "seq_aux_loss, global_aux_loss, none"),
        (dict(moe_router_enable_expert_bias=True),
         "--moe-router-enable-expert-bias needs --moe-router-score-function"),
        (dict(moe_router_num_groups=3, moe_router_group_topk=1),
         "needs --moe-router-num-groups dividing the 8 experts"),
        (dict(moe_router_num_groups=4, moe_router_group_topk=3),
         "--moe-router-group-topk 3 with --moe-router-num-groups 4"),
        (dict(moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"], moe_aux_loss_coeff=[0.1]),
         "give --moe-aux-loss-coeff a list of 2 coefficients"),
        (
            dict(moe_token_drop_policy="random"),
            "--moe-token-drop-policy 'random' is not valid; valid values: probs, position",
        ),
    ],
)
def test_layer_rejects_what_it_cannot_honour(overrides, message):
    config = moe_config(2)
    for name, value in overrides.items():
        setattr(config, name, value)
    with pytest.raises(GranularMoEConfigError, match=message):
        GranularMoELayer(config)


def test_bad_router_type_and_kernels_fail_at_spec_time():
    with pytest.raises(
        GranularMoEConfigError, match="--moe-router-type 'top2' is not valid; valid values: token_choice, expert_choice"
    ):
        granular_moe_spec(router_type="top2")
    with pytest.raises(GranularMoEConfigError, match="--moe-kernels 'cuda' is not valid; valid values: auto, torch"):
        granular_moe_spec(kernels="cuda")
