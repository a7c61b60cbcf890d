"""Mixtral (``MixtralForCausalLM``): rope attention with grouped-query attention and no query/key norms;
softmax routing whose top-k gates are always renormalised (megatron-core's default: the top-k logits
softmaxed among themselves; so neither ``--moe-router-pre-softmax`` nor top-1, which the job gates with the
expert's probability); experts in every layer, stored as ``block_sparse_moe.experts.{e}.w1 / w3 / w2`` (gate,
up, down); no shared expert, expert bias, group limit or gate scaling."""

from __future__ import annotations

from granular_moe.hf.families import Family
from granular_moe.hf.families import common as c

NAME, TITLE, ARCHITECTURE = "mixtral", "Mixtral", "MixtralForCausalLM"
EXPERT_NAMES = ("w1", "w3", "w2")  # gate, up, down


def export_problems(args) -> list[str]:
    problems = c.base_problems(args, TITLE)
    if not c.get(args, "num_experts", 0):
        return problems
    problems += c.attention_problems(args, TITLE, ("none",))
    problems += c.shared_expert_problems(args, TITLE, required=False, gate=False)
    problems += c.softmax_routing_problems(args, TITLE)
    problems += c.gate_problems(args, TITLE, renormalised=True)
    problems += c.dense_layer_problems(args, TITLE, "none")
    return problems


def config(args, vocab_size: int, special_ids: dict, dtype: str):
    from transformers import MixtralConfig

    return MixtralConfig(
        **c.common_config(args, vocab_size, special_ids, dtype, ARCHITECTURE),
        intermediate_size=args.moe_ffn_hidden_size,
        num_key_value_heads=c.query_groups(args),
        head_dim=c.head_dim(args),
        sliding_window=None,
        num_local_experts=args.num_experts,
        router_aux_loss_coef=c.aux_loss_coeff(args),
        router_jitter_noise=0.0,
    )


def import_problems(config) -> list[str]:
    problems = c.import_problems(config, bias_key=None)
    if config.sliding_window is not None:
        problems.append(f"sliding_window {config.sliding_window}: the job attends to the whole sequence")
    if config.num_experts_per_tok == 1:
        problems.append("num_experts_per_tok 1: Mixtral's top-1 gate is 1 (renormalised), megatron-core gates top-1 "
                        "with the expert's probability")
    return problems


def flags(config) -> list:
    out = c.common_flags(config, config.num_local_experts, config.intermediate_size, config.intermediate_size)
    return out + [*c.gqa_flags(config, head_width=c.config_head_dim(config)),
                  "--moe-aux-loss-coeff", config.router_aux_loss_coef]


def mappings(args, vocab_size: int) -> list:
    def mlp(layer, src, dst):
        return c.routed_experts(args, layer, src, dst, block="block_sparse_moe.", experts_key="num_local_experts",
                                width_key="intermediate_size", names=EXPERT_NAMES)

    return c.decoder_mappings(args, vocab_size, lambda layer, src, dst: c.gqa_attention(args, layer, src, dst), mlp)


FAMILY = Family(NAME, TITLE, ARCHITECTURE, export_problems, config, import_problems, flags, mappings)
