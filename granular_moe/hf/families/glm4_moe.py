"""GLM-4.5 (``Glm4MoeForCausalLM``): grouped-query attention with query/key/value biases or none
(``attention_bias``: the job's ``--add-qkv-bias``; the output projection has none), per-head query/key RMSNorm
or none (``use_qk_norm``), rope on the first ``partial_rotary_factor`` of each head (the job's
``--rotary-percent``, megatron-core's rotate-half rope on the head's first part), ``head_dim`` free; DeepSeek's
routing (sigmoid scores, the ``e_score_correction_bias``, gates renormalised when k > 1 and scaled by
``routed_scaling_factor``, groups scored by their 2 best experts); a shared expert of a whole number of routed
experts in every MoE layer; the dense layers first (``first_k_dense_replace``); no multi-token prediction
layers."""

from __future__ import annotations

from granular_moe.hf.families import Family
from granular_moe.hf.families import common as c
from granular_moe.hf.families.deepseek_v3 import moe_mlp, routing_fields, routing_flags, routing_import_problems

NAME, TITLE, ARCHITECTURE = "glm4_moe", "GLM-4.5", "Glm4MoeForCausalLM"


def export_problems(args) -> list[str]:
    problems = c.base_problems(args, TITLE)
    if not c.get(args, "num_experts", 0):
        return problems
    problems += c.attention_problems(args, TITLE, ("none", "head"), qkv_bias=True, partial_rope=True)
    problems += c.sigmoid_routing_problems(args, TITLE)
    problems += c.shared_expert_problems(args, TITLE, required=True, gate=False, whole_experts=True)
    problems += c.dense_layer_problems(args, TITLE, "first")
    return problems


def config(args, vocab_size: int, special_ids: dict, dtype: str):
    from transformers import Glm4MoeConfig

    fields = c.common_config(args, vocab_size, special_ids, dtype, ARCHITECTURE)
    fields["rope_parameters"]["partial_rotary_factor"] = c.rotary_percent(args)
    return Glm4MoeConfig(
        **fields,
        **routing_fields(args),
        num_key_value_heads=c.query_groups(args),
        head_dim=c.head_dim(args),
        attention_bias=bool(c.get(args, "add_qkv_bias", False)),
        use_qk_norm=c.qk_norm(args) == "head",
    )


def import_problems(config) -> list[str]:
    problems = c.import_problems(config, bias_key=None, partial_rope=True)
    head = c.config_head_dim(config)
    factor = config.rope_parameters.get("partial_rotary_factor", 1.0)
    if int(head * factor) % 2:
        problems.append(f"rope_parameters.partial_rotary_factor {factor} of head_dim {head}: rope needs an even "
                        "number of rotated dimensions")
    return problems + routing_import_problems(config, config.num_experts_per_tok)


def flags(config) -> list:
    out = c.common_flags(config, config.n_routed_experts, config.moe_intermediate_size, config.intermediate_size)
    out += [*c.gqa_flags(config, head_width=c.config_head_dim(config)), *routing_flags(config),
            "--rotary-percent", config.rope_parameters.get("partial_rotary_factor", 1.0)]
    if config.attention_bias:
        out.append("--add-qkv-bias")
    if config.use_qk_norm:
        out.append("--qk-layernorm")
    return out


def mappings(args, vocab_size: int) -> list:
    pattern = c.moe_pattern(args)

    def mlp(layer, src, dst):
        return moe_mlp(args, layer, src, dst) if pattern[layer] else c.dense_mlp(args, layer, src, dst)

    return c.decoder_mappings(args, vocab_size, lambda layer, src, dst: c.gqa_attention(args, layer, src, dst), mlp)


FAMILY = Family(NAME, TITLE, ARCHITECTURE, export_problems, config, import_problems, flags, mappings)
