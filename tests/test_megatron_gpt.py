"""megatron-core's GPTModel and HybridModel built with the plugin's specs train on the CPU in a gloo process group,
with the granular layer in every MoE position; a spec that cannot place it says so."""

import re

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt import gpt_layer_specs as megatron_specs
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_config import TransformerConfig

from granular_moe import GranularMoELayer
from granular_moe.megatron import (
    MissingMoEPositionError,
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
    get_hybrid_stack_spec,
)
from helpers import moe_config

VOCAB, SEQ, BATCH = 64, 16, 4


def gpt_config(**overrides):
    settings = {"moe_aux_loss_coeff": 1e-2, "moe_z_loss_coeff": 1e-3, **overrides}
    return moe_config(4, num_experts=4, topk=1, hidden=32, ffn=64, dtype=torch.float32, num_attention_heads=4,
                      **settings)


def lm_loss(model, tokens):
    position_ids = torch.arange(SEQ).expand(BATCH, SEQ)
    causal = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).triu(1)
    return model(
        tokens[:, :-1], position_ids[:, : SEQ - 1], causal[..., : SEQ - 1, : SEQ - 1], labels=tokens[:, 1:]
    ).mean()


def test_gpt_trains_with_granular_moe_in_every_layer(gloo_world):
    torch.manual_seed(0)
    config = gpt_config()
    model = GPTModel(config, get_gpt_decoder_block_spec(config, use_transformer_engine=False), VOCAB, SEQ)
    moe_layers = [m for m in model.modules() if isinstance(m, GranularMoELayer)]
    assert [m.layer_number for m in moe_layers] == [1, 2]
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = lm_loss(model, tokens)
        loss.backward()
        assert all(p.grad is not None for p in moe_layers[0].parameters())
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.3, losses
    assert moe_layers[0].stats.tokens_per_expert.sum() == BATCH * (SEQ - 1) * config.moe_router_topk


def test_moe_layer_freq_mixes_dense_and_granular_layers(gloo_world):
    config = gpt_config(num_layers=4, moe_layer_freq=[1, 0, 0, 1])
    model = GPTModel(config, get_gpt_decoder_block_spec(config, use_transformer_engine=False), VOCAB, SEQ)
    kinds = [type(layer.mlp) for layer in model.decoder.layers]
    assert kinds == [GranularMoELayer, MLP, MLP, GranularMoELayer]
    assert model.decoder.layers[1].mlp.linear_fc1.weight.shape[0] == config.ffn_hidden_size
    loss = lm_loss(model, torch.randint(0, VOCAB, (BATCH, SEQ)))
    loss.backward()
    assert torch.isfinite(loss)


def test_layer_spec_passes_router_type_and_megatron_options(gloo_world):
    config = gpt_config(qk_layernorm=True, moe_aux_loss_coeff=0.0)  # expert choice: balanced by construction
    spec = get_gpt_layer_local_spec(config.num_moe_experts, router_type="expert_choice", qk_layernorm=True)
    model = GPTModel(config, spec, VOCAB, SEQ)
    layer = model.decoder.layers[0]
    assert layer.mlp.router_type == "expert_choice"
    assert not isinstance(layer.self_attention.q_layernorm, torch.nn.Identity)
    lm_loss(model, torch.randint(0, VOCAB, (BATCH, SEQ))).backward()


def test_transformer_engine_spec_needs_transformer_engine():
    if megatron_specs.HAVE_TE:
        spec = get_gpt_layer_with_transformer_engine_spec(8)
        assert spec.submodules.mlp.func is GranularMoELayer
    else:
        with pytest.raises(ImportError, match="local spec"):
            get_gpt_layer_with_transformer_engine_spec(8)


def test_spec_functions_refuse_a_config_whose_moe_layers_they_cannot_place(gloo_world):
    config = gpt_config(num_layers=2)
    # megatron-core's MoE position replaced by something the plugin does not know: a named error, not a model
    # silently without the granular layer
    original = megatron_specs.get_gpt_decoder_layer_specs

    def without_moe(config, use_transformer_engine, **kwargs):
        return [megatron_specs.get_gpt_layer_local_spec(num_experts=None)] * config.num_layers

    megatron_specs.get_gpt_decoder_layer_specs = without_moe
    try:
        with pytest.raises(MissingMoEPositionError, match=r"holds no MoELayer in layers \[1, 2\]"):
            get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    finally:
        megatron_specs.get_gpt_decoder_layer_specs = original
    with pytest.raises(MissingMoEPositionError, match="without an MoELayer"):
        get_gpt_layer_local_spec(None)


def hybrid_model(config, pattern):
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    spec = get_hybrid_stack_spec(config, use_transformer_engine=False, hybrid_layer_pattern=pattern)
    return HybridModel(config, spec, VOCAB, SEQ, hybrid_layer_pattern=pattern,
                       position_embedding_type="learned_absolute")


def test_hybrid_model_takes_the_granular_layer_in_its_moe_positions(gloo_world):
    torch.manual_seed(0)
    config = gpt_config(num_layers=4)
    model = hybrid_model(config, "*E*-")
    kinds = [type(getattr(layer, "mlp", None)).__name__ for layer in model.decoder.layers]
    assert kinds == ["IdentityOp", "GranularMoELayer", "IdentityOp", "MLP"]
    moe = model.decoder.layers[1].mlp
    assert moe.layer_number == 2
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = lm_loss(model, tokens)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
    assert moe.stats.tokens_per_expert.sum() == BATCH * (SEQ - 1) * config.moe_router_topk


@pytest.mark.parametrize("pattern, experts, message", [
    ("*-*-", 4, "has no MoE layer"),
    ("*E*E", None, "--num-experts is not set"),
    ("M*E*", 4, "'M', which need Transformer Engine"),
])
def test_hybrid_spec_refuses_patterns_it_cannot_fill(gloo_world, pattern, experts, message):
    config = gpt_config(num_layers=4) if experts else TransformerConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
    with pytest.raises(MissingMoEPositionError, match=re.escape(message)):
        get_hybrid_stack_spec(config, use_transformer_engine=False, hybrid_layer_pattern=pattern)


def test_local_hybrid_spec_names_the_layers_it_lacks_when_built(gloo_world):
    config = gpt_config(num_layers=2)
    with pytest.raises(MissingMoEPositionError, match="hybrid layer 'M' has no local"):
        hybrid_model_without_check(config, "ME")


def hybrid_model_without_check(config, pattern):
    from megatron.core.models.hybrid.hybrid_model import HybridModel

    return HybridModel(config, get_hybrid_stack_spec(config, use_transformer_engine=False), VOCAB, SEQ,
                       hybrid_layer_pattern=pattern)
