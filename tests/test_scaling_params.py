"""Parameter counts against the megatron-core GPT the plugin builds, and across granularities."""

import pytest
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from granular_moe.config import GranularMoEConfigError, apply_granularity
from granular_moe.megatron import get_gpt_decoder_block_spec
from granular_moe.scaling import ModelShape, PaperArchitecture, count_parameters, shape_from_args
from granular_moe.training.arguments import parse_args

VOCAB, SEQ = 96, 16


def build_gpt(shape: ModelShape) -> GPTModel:
    """The model ``shape`` describes, built the way the main job builds it."""
    moe = bool(shape.num_experts)
    config = TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_query_groups,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_moe_experts=shape.num_experts,
        moe_router_topk=shape.moe_router_topk,
        moe_router_pre_softmax=shape.moe_router_topk == 1,
        moe_layer_freq=shape.moe_layer_freq,
        gated_linear_unit=shape.swiglu,
        normalization=shape.normalization,
        qk_layernorm=shape.qk_layernorm,
        add_bias_linear=shape.add_bias_linear,
        moe_shared_expert_intermediate_size=shape.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=shape.moe_shared_expert_gate,
        use_cpu_initialization=True,
    )
    if moe:
        config = apply_granularity(config, shape.moe_granularity)
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=shape.normalization)
    return GPTModel(
        config, spec, shape.vocab_size, shape.max_position_embeddings,
        position_embedding_type=shape.position_embedding_type,
        share_embeddings_and_output_weights=not shape.untie_embeddings_and_output_weights,
    )


SHAPES = {
    "moe_g1_layernorm_learned_tied": ModelShape(
        num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=VOCAB,
        num_experts=8, moe_router_topk=1, max_position_embeddings=SEQ),
    "moe_g4_swiglu_rmsnorm_rope_untied_gqa_qknorm_mixed": ModelShape(
        num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        vocab_size=VOCAB, num_experts=4, moe_router_topk=2, moe_granularity=4, moe_layer_freq=[1, 0, 1],
        swiglu=True, normalization="RMSNorm", qk_layernorm=True, position_embedding_type="rope",
        untie_embeddings_and_output_weights=True),
    "moe_g4_shared_gated_expert_mixed": ModelShape(
        num_layers=3, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, vocab_size=VOCAB, num_experts=4,
        moe_router_topk=1, moe_granularity=4, moe_layer_freq=[0, 1, 1], swiglu=True, normalization="RMSNorm",
        position_embedding_type="rope", moe_shared_expert_intermediate_size=24, moe_shared_expert_gate=True),
    "dense_with_biases": ModelShape(
        num_layers=2, hidden_size=32, num_attention_heads=2, ffn_hidden_size=48, vocab_size=VOCAB,
        add_bias_linear=True, max_position_embeddings=SEQ),
}


@pytest.mark.parametrize("name", SHAPES)
def test_counts_equal_the_built_model(gloo_world, name):
    shape = SHAPES[name]
    count = count_parameters(shape)
    params = dict(build_gpt(shape).named_parameters())
    assert count.total == sum(p.numel() for p in params.values())
    assert count.router == sum(p.numel() for n, p in params.items() if n.endswith("mlp.router.weight"))
    assert count.experts == sum(p.numel() for n, p in params.items() if ".mlp.experts." in n)
    assert count.embedding == sum(p.numel() for n, p in params.items() if "embedding" in n or "output_layer" in n)
    assert count.norms == sum(p.numel() for n, p in params.items() if "norm" in n)
    assert count.shared_experts == sum(p.numel() for n, p in params.items() if ".shared_experts." in n)
    assert (count.shared_experts > 0) == bool(shape.moe_shared_expert_intermediate_size)


def test_granularity_keeps_expert_and_active_params_and_grows_the_router():
    shapes = [ModelShape(num_layers=4, hidden_size=256, num_attention_heads=4, ffn_hidden_size=1024, vocab_size=1000,
                         num_experts=8, moe_router_topk=2, moe_granularity=g, max_position_embeddings=128)
              for g in (1, 2, 4, 8, 16)]
    counts = [count_parameters(s) for s in shapes]
    assert len({c.experts for c in counts}) == 1 and len({c.active_experts for c in counts}) == 1
    assert len({c.law for c in counts}) == 1
    assert [c.router for c in counts] == [4 * 8 * g * 256 for g in (1, 2, 4, 8, 16)]  # layers x E*G x h
    assert counts[0].active_experts == 4 * 2 * 2 * 256 * 1024  # layers x k x (fc1 + fc2) per expert
    assert counts[0].experts == 4 * 8 * 2 * 256 * 1024
    assert counts[-1].total - counts[0].total == counts[-1].router - counts[0].router


@pytest.mark.parametrize("n_blocks", [4, 12])
def test_law_params_are_the_papers_n_for_its_architecture(n_blocks):
    arch = PaperArchitecture(n_blocks, 64)
    d = int(arch.d_model)
    shape = ModelShape(num_layers=n_blocks, hidden_size=d, num_attention_heads=n_blocks, ffn_hidden_size=4 * d,
                       vocab_size=50304, num_experts=64, moe_router_topk=1, moe_granularity=8)
    count = count_parameters(shape)
    assert count.law == arch.params
    assert count.active - count.embedding - count.norms - count.router == arch.active_params


def test_shape_from_parsed_main_job_args():
    args = parse_args(["--num-layers", "3", "--hidden-size", "64", "--num-attention-heads", "4", "--num-experts", "8",
                       "--moe-router-topk", "2", "--moe-granularity", "4", "--swiglu", "--vocab-size", "500",
                       "--seq-length", "32", "--moe-layer-freq", "([1]*2+[0])"])
    shape = shape_from_args(args)
    assert (shape.num_experts, shape.moe_router_topk, shape.moe_granularity) == (8, 2, 4)
    assert shape.ffn_hidden_size == 128  # Megatron's SwiGLU default: 2/3 of 4h, down to a multiple of 64
    assert shape.moe_layers == [True, True, False]
    count = count_parameters(shape)
    assert count.router == 2 * 32 * 64
    assert count.experts == 2 * 32 * 3 * 64 * (128 // 4)


def test_bad_shapes_name_the_flag():
    with pytest.raises(GranularMoEConfigError, match="--normalization"):
        ModelShape(num_layers=1, hidden_size=8, num_attention_heads=1, ffn_hidden_size=8, vocab_size=8,
                   normalization="BatchNorm")
    with pytest.raises(GranularMoEConfigError, match="--moe-layer-freq"):
        ModelShape(num_layers=2, hidden_size=8, num_attention_heads=1, ffn_hidden_size=8, vocab_size=8,
                   num_experts=2, moe_layer_freq=[1, 0, 1])
    with pytest.raises(GranularMoEConfigError, match="--moe-granularity 3"):
        count_parameters(ModelShape(num_layers=1, hidden_size=8, num_attention_heads=1, ffn_hidden_size=8,
                                    vocab_size=8, num_experts=2, moe_granularity=3))
