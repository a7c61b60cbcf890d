"""Qwen2-MoE (``Qwen2MoeForCausalLM``): rope attention with grouped-query attention, query/key/value biases
or none (``qkv_bias``: the job's ``--add-qkv-bias``), no query/key norms; softmax routing, the top-k gates
renormalised (``norm_topk_prob``) or not (megatron-core's pre-softmax, and any top-1); a shared expert with a
sigmoid gate in every MoE layer (megatron-core's ``SharedExpertMLP`` with ``--moe-shared-expert-gate``:
``sigmoid(x @ gate) * shared(x)``, as ``shared_expert_gate``); dense layers anywhere (``mlp_only_layers``)."""

from __future__ import annotations

from granular_moe.hf.families import Family
from granular_moe.hf.families import common as c
from granular_moe.hf.families.qwen3_moe import moe_layers, qwen_import_problems, qwen_moe_fields
from granular_moe.hf.mappings import Same, dim

NAME, TITLE, ARCHITECTURE = "qwen2_moe", "Qwen2-MoE", "Qwen2MoeForCausalLM"


def export_problems(args) -> list[str]:
    problems = c.base_problems(args, TITLE)
    if not c.get(args, "num_experts", 0):
        return problems
    problems += c.attention_problems(args, TITLE, ("none",), qkv_bias=True)
    problems += c.shared_expert_problems(args, TITLE, required=True, gate=True)
    problems += c.softmax_routing_problems(args, TITLE)
    return problems


def config(args, vocab_size: int, special_ids: dict, dtype: str):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **c.common_config(args, vocab_size, special_ids, dtype, ARCHITECTURE),
        **qwen_moe_fields(args),
        shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        # Qwen2-MoE's code reads head_dim when the config has one (hidden_size / num_attention_heads otherwise)
        **({} if c.head_dim(args) * args.num_attention_heads == args.hidden_size else {"head_dim": c.head_dim(args)}),
        qkv_bias=bool(c.get(args, "add_qkv_bias", False)),
    )


def import_problems(config) -> list[str]:
    problems = c.import_problems(config, bias_key=None) + qwen_import_problems(config)
    if not config.shared_expert_intermediate_size:
        problems.append("shared_expert_intermediate_size 0: import-hf needs the shared expert")
    return problems


def flags(config) -> list:
    out = c.common_flags(config, config.num_experts, config.moe_intermediate_size, config.intermediate_size)
    out += [*c.gqa_flags(config, head_width=c.config_head_dim(config)), "--moe-layer-freq", str(moe_layers(config)),
            "--moe-shared-expert-intermediate-size", config.shared_expert_intermediate_size, "--moe-shared-expert-gate",
            "--moe-aux-loss-coeff", config.router_aux_loss_coef]
    if config.qkv_bias:
        out.append("--add-qkv-bias")
    if not config.norm_topk_prob:
        out.append("--moe-router-pre-softmax")
    return out


def mappings(args, vocab_size: int) -> list:
    pattern = c.moe_pattern(args)

    def mlp(layer, src, dst):
        if not pattern[layer]:
            return c.dense_mlp(args, layer, src, dst)
        return (c.routed_experts(args, layer, src, dst)
                + c.shared_expert(args, layer, src, dst, "mlp.shared_expert.", "shared_expert_intermediate_size")
                + [Same(src + "mlp.shared_experts.gate_weight", dst + "mlp.shared_expert_gate.weight",
                        (dim(1, "1"), c.hidden(args)), layer)])

    return c.decoder_mappings(args, vocab_size, lambda layer, src, dst: c.gqa_attention(args, layer, src, dst), mlp)


FAMILY = Family(NAME, TITLE, ARCHITECTURE, export_problems, config, import_problems, flags, mappings)
