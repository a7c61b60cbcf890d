"""Qwen3-MoE (``Qwen3MoeForCausalLM``): rope attention with q/k RMSNorm per head and grouped-query attention;
softmax routing, the top-k gates renormalised (``norm_topk_prob``) or not (megatron-core's pre-softmax, and any
top-1); no shared expert, no expert bias, no group limit, no gate scaling; dense layers anywhere
(``mlp_only_layers``)."""

from __future__ import annotations

from granular_moe.hf.families import Family
from granular_moe.hf.families import common as c

NAME, TITLE, ARCHITECTURE = "qwen3_moe", "Qwen3-MoE", "Qwen3MoeForCausalLM"


def export_problems(args) -> list[str]:
    problems = c.base_problems(args, TITLE)
    if not c.get(args, "num_experts", 0):
        return problems
    problems += c.attention_problems(args, TITLE, ("head",))
    problems += c.shared_expert_problems(args, TITLE, required=False, gate=False)
    problems += c.softmax_routing_problems(args, TITLE)
    return problems


def config(args, vocab_size: int, special_ids: dict, dtype: str):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**c.common_config(args, vocab_size, special_ids, dtype, ARCHITECTURE),
                          **qwen_moe_fields(args), attention_bias=False, head_dim=c.head_dim(args))


def qwen_moe_fields(args) -> dict:
    """The ``config.json`` fields of Qwen's MoE layout (shared with Qwen2-MoE): softmax routing, dense layers
    anywhere, no sliding window."""
    return dict(
        intermediate_size=c.ffn_hidden_size(args),
        moe_intermediate_size=args.moe_ffn_hidden_size,
        num_key_value_heads=c.query_groups(args),
        use_sliding_window=False,
        decoder_sparse_step=1,
        mlp_only_layers=c.dense_layers(args),
        num_experts=args.num_experts,
        norm_topk_prob=not c.pre_softmax(args),
        router_aux_loss_coef=c.aux_loss_coeff(args),
    )


def qwen_import_problems(config) -> list[str]:
    """What the job cannot build of Qwen's MoE layout (shared with Qwen2-MoE)."""
    problems = []
    if getattr(config, "use_sliding_window", False):
        problems.append("use_sliding_window true: the job attends to the whole sequence")
    return problems + c.renormalised_top1_problems(config)


def import_problems(config) -> list[str]:
    return c.import_problems(config) + qwen_import_problems(config)


def moe_layers(config) -> list[int]:
    return [int(layer not in config.mlp_only_layers and (layer + 1) % config.decoder_sparse_step == 0)
            for layer in range(config.num_hidden_layers)]


def flags(config) -> list:
    out = c.common_flags(config, config.num_experts, config.moe_intermediate_size, config.intermediate_size)
    out += ["--qk-layernorm", *c.gqa_flags(config, head_width=c.config_head_dim(config)),
            "--moe-layer-freq", str(moe_layers(config)), "--moe-aux-loss-coeff", config.router_aux_loss_coef]
    if not config.norm_topk_prob:
        out.append("--moe-router-pre-softmax")
    return out


def mappings(args, vocab_size: int) -> list:
    pattern = c.moe_pattern(args)

    def mlp(layer, src, dst):
        if not pattern[layer]:
            return c.dense_mlp(args, layer, src, dst)
        return c.routed_experts(args, layer, src, dst, experts_key="num_experts")

    return c.decoder_mappings(args, vocab_size, lambda layer, src, dst: c.gqa_attention(args, layer, src, dst), mlp)


FAMILY = Family(NAME, TITLE, ARCHITECTURE, export_problems, config, import_problems, flags, mappings)
