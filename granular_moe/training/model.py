"""The main job's model: a megatron-core GPT (granular MoE where ``--moe-layer-freq`` puts MoE) built from
the parsed flags: this rank's pipeline stage, as one chunk per virtual pipeline stage."""

from __future__ import annotations

import argparse
import dataclasses

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from granular_moe.megatron import get_gpt_decoder_block_spec
from granular_moe.megatron.arguments import megatron_default_ffn_hidden_size


def padded_vocab_size(vocab_size: int, tensor_parallel: int, divisible_by: int = 128) -> int:
    """Megatron-LM's padding (``--make-vocab-size-divisible-by 128`` per tensor-parallel rank)."""
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def transformer_config_from_args(args: argparse.Namespace) -> TransformerConfig:
    """The megatron-core config of the parsed flags (MoE fields already fine-grained)."""
    moe = bool(args.num_experts)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    ffn = args.ffn_hidden_size or megatron_default_ffn_hidden_size(args.hidden_size, args.swiglu)
    fields = dict(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=ffn,
        num_attention_heads=args.num_attention_heads,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        normalization=args.normalization,
        qk_layernorm=args.qk_layernorm,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        layernorm_epsilon=getattr(args, "norm_epsilon", 1e-5),
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=False,
        add_qkv_bias=getattr(args, "add_qkv_bias", False),
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=1,
        sequence_parallel=args.sequence_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(args),
        bf16=args.bf16,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        use_cpu_initialization=not torch.cuda.is_available(),
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        recompute_modules=args.recompute_modules,
    )
    if moe:
        fields.update(
            num_moe_experts=args.num_experts,
            moe_router_topk=args.moe_router_topk,
            moe_ffn_hidden_size=args.moe_ffn_hidden_size,
            moe_layer_freq=args.moe_layer_freq,
            moe_aux_loss_coeff=args.moe_aux_loss_coeff,
            moe_z_loss_coeff=args.moe_z_loss_coeff,
            moe_expert_capacity_factor=args.moe_expert_capacity_factor,
            moe_token_drop_policy=args.moe_token_drop_policy,
            moe_router_load_balancing_type=args.moe_router_load_balancing_type,
            moe_router_dtype=args.moe_router_dtype,
            moe_router_score_function=args.moe_router_score_function,
            moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
            moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=args.moe_router_bias_update_rate,
            moe_router_num_groups=args.moe_router_num_groups,
            moe_router_group_topk=args.moe_router_group_topk,
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=args.moe_shared_expert_gate,
            # top-1 softmax routing is pre-softmax (megatron-core refuses it otherwise: the gate would be 1)
            moe_router_pre_softmax=args.moe_router_pre_softmax or args.moe_router_topk == 1,
            # the granular experts are grouped GEMMs (megatron-core allows moe_act recompute only with them)
            moe_grouped_gemm=True,
        )
    if getattr(args, "multi_latent_attention", False):
        # megatron-core's MLA with plain rope on each head's rope part (no yarn scaling: softmax scale
        # 1 / sqrt(qk_head_dim + qk_pos_emb_head_dim)), DeepSeek's interleaved rope layout
        fields.update(
            q_lora_rank=args.q_lora_rank,
            kv_lora_rank=args.kv_lora_rank,
            qk_head_dim=args.qk_head_dim,
            qk_pos_emb_head_dim=args.qk_pos_emb_head_dim,
            v_head_dim=args.v_head_dim,
            rope_type="rope",
            rotary_base=args.rotary_base,
            rotary_scaling_factor=1.0,
        )
        return MLATransformerConfig(**fields)
    return TransformerConfig(**fields)


class SequenceParallelTorchNorm:
    """megatron-core's torch LayerNorm / RMSNorm (``WrappedTorchNorm``) under sequence parallelism, which
    megatron-core refuses without Apex or Transformer Engine: the same torch norm, its parameters marked
    ``sequence_parallel`` (as Apex's FusedLayerNorm marks them) so that their gradients, each from one
    rank's sequence shard, are summed over the tensor-parallel group."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **unused):
        norm_class = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}[config.normalization]
        norm = norm_class(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm


def with_sequence_parallel_norms(block: TransformerBlockSubmodules) -> TransformerBlockSubmodules:
    """``block`` with its torch norms (layer inputs, before the MLP, the final one) made sequence-parallel."""

    def swap(norm):
        return SequenceParallelTorchNorm if norm is WrappedTorchNorm else norm

    layers = [
        dataclasses.replace(spec, submodules=dataclasses.replace(
            spec.submodules,
            input_layernorm=swap(spec.submodules.input_layernorm),
            pre_mlp_layernorm=swap(spec.submodules.pre_mlp_layernorm),
        ))
        for spec in block.layer_specs
    ]
    return dataclasses.replace(block, layer_specs=layers, layer_norm=swap(block.layer_norm))


class LatentDotProductAttention(DotProductAttention):
    """megatron-core's local (non Transformer Engine) ``DotProductAttention`` for multi-latent attention, which
    builds its core attention with ``k_channels`` (the query/key head width, rope part included) and
    ``v_channels`` (the value head width): the local class takes neither (megatron-core 0.19 gives MLA only
    Transformer Engine's). Its arithmetic takes each width from the tensors; only the output width is the
    value heads', and the softmax scale is the one MLA passes (``1 / sqrt(qk_head_dim + qk_pos_emb_head_dim)``)."""

    def __init__(self, config, *args, k_channels=None, v_channels=None, **kwargs):
        super().__init__(config, *args, **kwargs)
        if v_channels is not None:
            self.hidden_size_per_partition = v_channels * self.num_attention_heads_per_partition


def with_latent_core_attention(block: TransformerBlockSubmodules) -> TransformerBlockSubmodules:
    """``block`` with the core attention of its local MLA layers made :class:`LatentDotProductAttention`."""

    def swap(spec):
        attention = spec.submodules.self_attention
        submodules = getattr(attention, "submodules", None)
        if getattr(submodules, "core_attention", None) is not DotProductAttention:
            return spec
        attention = dataclasses.replace(
            attention, submodules=dataclasses.replace(submodules, core_attention=LatentDotProductAttention))
        return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))

    return dataclasses.replace(block, layer_specs=[swap(spec) for spec in block.layer_specs])


class _ProjectionRMSNorm(torch.nn.RMSNorm):
    """megatron-core's query/key norm slot, filled with an RMSNorm over each token's whole projection (all its
    heads together, as OLMoE's ``q_norm`` / ``k_norm``) instead of each head: megatron-core 0.19 normalises
    ``[sq, b, heads, head_dim]`` over the last dimension only. One tensor-parallel rank holds every head
    (``--qk-layernorm-across-heads`` needs TP 1), so the norm's weight is the whole ``heads x head_dim``."""

    heads_field = "num_attention_heads"

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(getattr(config, self.heads_field) * hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(*x.shape[:-2], -1)).view_as(x)


class QueryProjectionRMSNorm(_ProjectionRMSNorm):
    heads_field = "num_attention_heads"


class KeyProjectionRMSNorm(_ProjectionRMSNorm):
    heads_field = "num_query_groups"


def with_projection_qk_norms(block: TransformerBlockSubmodules) -> TransformerBlockSubmodules:
    """``block`` with its query/key norms over each token's whole projection (``--qk-layernorm-across-heads``)."""

    def swap(spec):
        attention = spec.submodules.self_attention
        submodules = dataclasses.replace(attention.submodules, q_layernorm=QueryProjectionRMSNorm,
                                         k_layernorm=KeyProjectionRMSNorm)
        attention = dataclasses.replace(attention, submodules=submodules)
        return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=attention))

    return dataclasses.replace(block, layer_specs=[swap(spec) for spec in block.layer_specs])


def virtual_pipeline_size(args: argparse.Namespace):
    """Model chunks per pipeline rank for ``--num-layers-per-virtual-pipeline-stage`` (None: one)."""
    per_chunk = args.num_layers_per_virtual_pipeline_stage
    if per_chunk is None:
        return None
    chunks = args.num_layers // args.pipeline_model_parallel_size // per_chunk
    return chunks if chunks > 1 else None


def build_model_chunks(args: argparse.Namespace, config: TransformerConfig, vocab_size: int) -> list[GPTModel]:
    """This rank's pipeline stage of the GPT: one model per virtual pipeline stage (one without
    ``--num-layers-per-virtual-pipeline-stage``), each holding its slice of layers."""
    stages = config.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for stage in range(stages):
        vp_stage = stage if stages > 1 else None
        # Megatron's decoder block; the granular layer in its MoE positions (none in a dense model)
        block = get_gpt_decoder_block_spec(
            config,
            use_transformer_engine=False,
            router_type=args.moe_router_type,
            kernels=args.moe_kernels,
            normalization=args.normalization,
            vp_stage=vp_stage,
        )
        if config.sequence_parallel:
            block = with_sequence_parallel_norms(block)
        if config.multi_latent_attention:
            block = with_latent_core_attention(block)
        if getattr(args, "qk_layernorm_across_heads", False):
            block = with_projection_qk_norms(block)
        model = GPTModel(
            config,
            block,
            vocab_size=padded_vocab_size(vocab_size, args.tensor_model_parallel_size),
            max_sequence_length=args.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
            position_embedding_type=args.position_embedding_type,
            rotary_base=args.rotary_base,
            rotary_percent=getattr(args, "rotary_percent", 1.0),
            vp_stage=vp_stage,
        )
        for param in model.parameters():
            tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
        chunks.append(model.cuda() if torch.cuda.is_available() else model)
    return chunks
