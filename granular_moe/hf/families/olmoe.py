"""OLMoE (``OlmoeForCausalLM``): rope attention with grouped-query attention whose queries and keys are
RMS-normalised over each token's whole projection, all heads together (``q_norm`` is ``hidden_size`` wide,
``k_norm`` ``hidden_size / num_attention_heads x num_key_value_heads``): the job's ``--qk-layernorm
--qk-layernorm-across-heads`` (megatron-core 0.19's ``--qk-layernorm`` normalises each head on its own, which
OLMoE's code does not compute); softmax routing, the top-k gates renormalised (``norm_topk_prob``) or not
(megatron-core's pre-softmax, and any top-1); experts in every layer; no shared expert, expert bias, group
limit or gate scaling; no biases, no ``clip_qkv``."""

from __future__ import annotations

from granular_moe.hf.families import Family
from granular_moe.hf.families import common as c

NAME, TITLE, ARCHITECTURE = "olmoe", "OLMoE", "OlmoeForCausalLM"


def export_problems(args) -> list[str]:
    problems = c.base_problems(args, TITLE)
    if not c.get(args, "num_experts", 0):
        return problems
    problems += c.attention_problems(args, TITLE, ("projection",))
    if c.head_dim(args) * args.num_attention_heads != args.hidden_size:
        problems.append(f"--kv-channels {c.head_dim(args)}: {TITLE}'s heads are hidden_size / num_attention_heads = "
                        f"{args.hidden_size // args.num_attention_heads} wide (its q_norm is hidden_size wide)")
    problems += c.shared_expert_problems(args, TITLE, required=False, gate=False)
    problems += c.softmax_routing_problems(args, TITLE)
    problems += c.dense_layer_problems(args, TITLE, "none")
    return problems


def config(args, vocab_size: int, special_ids: dict, dtype: str):
    from transformers import OlmoeConfig

    return OlmoeConfig(
        **c.common_config(args, vocab_size, special_ids, dtype, ARCHITECTURE),
        intermediate_size=args.moe_ffn_hidden_size,
        num_key_value_heads=c.query_groups(args),
        attention_bias=False,
        clip_qkv=None,
        num_experts=args.num_experts,
        norm_topk_prob=not c.pre_softmax(args),
        router_aux_loss_coef=c.aux_loss_coeff(args),
    )


def import_problems(config) -> list[str]:
    problems = c.import_problems(config)
    if config.clip_qkv is not None:
        problems.append(f"clip_qkv {config.clip_qkv}: the job does not clamp queries, keys and values")
    if getattr(config, "head_dim", None) not in (None, config.hidden_size // config.num_attention_heads):
        problems.append(f"head_dim {config.head_dim}: OLMoE's q_norm is hidden_size wide, so its heads are "
                        "hidden_size / num_attention_heads wide")
    problems += c.renormalised_top1_problems(config)
    return problems


def flags(config) -> list:
    out = c.common_flags(config, config.num_experts, config.intermediate_size, config.intermediate_size)
    out += ["--qk-layernorm", "--qk-layernorm-across-heads", *c.gqa_flags(config),
            "--moe-aux-loss-coeff", config.router_aux_loss_coef]
    if not config.norm_topk_prob:
        out.append("--moe-router-pre-softmax")
    return out


def mappings(args, vocab_size: int) -> list:
    def mlp(layer, src, dst):
        return c.routed_experts(args, layer, src, dst, experts_key="num_experts", width_key="intermediate_size")

    return c.decoder_mappings(args, vocab_size, lambda layer, src, dst: c.gqa_attention(args, layer, src, dst), mlp)


FAMILY = Family(NAME, TITLE, ARCHITECTURE, export_problems, config, import_problems, flags, mappings)
