"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): multi-head latent attention (DeepSeek's interleaved rope on each
head's rope part, the latents RMS-normalised with epsilon 1e-6); sigmoid routing with the aux-loss-free bias
(``e_score_correction_bias``), gates renormalised when k > 1 and scaled (``routed_scaling_factor``);
group-limited top-k where a group scores the sum of its 2 best experts (so top-k = 2 x the groups kept); one
shared expert of a multiple of the expert width; the dense layers first (``first_k_dense_replace``)."""

from __future__ import annotations

from granular_moe.hf.families import Family
from granular_moe.hf.families import common as c
from granular_moe.hf.mappings import Same, dim

NAME, TITLE, ARCHITECTURE = "deepseek_v3", "DeepSeek-V3", "DeepseekV3ForCausalLM"
# transformers' DeepseekV3 builds its q/kv latent norms with the RMSNorm default epsilon, not rms_norm_eps
LATENT_NORM_EPSILON = 1e-6


def export_problems(args) -> list[str]:
    problems = c.base_problems(args, TITLE)
    if not c.get(args, "num_experts", 0):
        return problems
    if not c.get(args, "multi_latent_attention", False):
        problems.append(f"--multi-latent-attention not set: {TITLE}'s attention is multi-head latent attention")
    elif not c.get(args, "qk_layernorm", False):
        problems.append(f"--qk-layernorm not set: {TITLE} RMS-normalises the query and key/value latents")
    epsilon = c.get(args, "norm_epsilon", 1e-5)
    if epsilon != LATENT_NORM_EPSILON:
        problems.append(f"--norm-epsilon {epsilon:g}: {TITLE} normalises its latents with epsilon "
                        f"{LATENT_NORM_EPSILON:g} whatever rms_norm_eps says; train with --norm-epsilon 1e-6")
    if c.get(args, "add_qkv_bias", False):
        problems.append(f"--add-qkv-bias: {TITLE} has no attention biases")
    if c.rotary_percent(args) != 1.0:
        problems.append(f"--rotary-percent {c.rotary_percent(args):g}: {TITLE}'s rope part is --qk-pos-emb-head-dim")
    problems += c.sigmoid_routing_problems(args, TITLE)
    problems += c.shared_expert_problems(args, TITLE, required=True, gate=False, whole_experts=True)
    problems += c.dense_layer_problems(args, TITLE, "first")
    return problems


def config(args, vocab_size: int, special_ids: dict, dtype: str):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        **c.common_config(args, vocab_size, special_ids, dtype, ARCHITECTURE),
        **routing_fields(args),
        attention_bias=False,
        num_key_value_heads=args.num_attention_heads,
        q_lora_rank=c.get(args, "q_lora_rank"),
        kv_lora_rank=args.kv_lora_rank,
        qk_rope_head_dim=args.qk_pos_emb_head_dim,
        qk_nope_head_dim=args.qk_head_dim,
        v_head_dim=args.v_head_dim,
        rope_interleave=True,
    )


def routing_fields(args) -> dict:
    """The ``config.json`` fields of DeepSeek-style routing, the shared expert and the dense layers first
    (shared with GLM-4.5); no multi-token prediction layers."""
    group_topk = c.get(args, "moe_router_group_topk")
    return dict(
        intermediate_size=c.ffn_hidden_size(args),
        moe_intermediate_size=args.moe_ffn_hidden_size,
        n_routed_experts=args.num_experts,
        n_shared_experts=args.moe_shared_expert_intermediate_size // args.moe_ffn_hidden_size,
        routed_scaling_factor=float(c.get(args, "moe_router_topk_scaling_factor", 1.0)),
        n_group=c.get(args, "moe_router_num_groups", 1) if group_topk else 1,
        topk_group=group_topk or 1,
        norm_topk_prob=args.moe_router_topk > 1,
        first_k_dense_replace=c.moe_pattern(args).count(0),
        num_nextn_predict_layers=0,
    )


def routing_import_problems(config, topk: int) -> list[str]:
    """DeepSeek-style routing fields the job cannot build (shared with GLM-4.5)."""
    problems = []
    if config.norm_topk_prob != (topk > 1):
        problems.append(f"norm_topk_prob {str(config.norm_topk_prob).lower()} with num_experts_per_tok {topk}: "
                        "megatron-core renormalises sigmoid gates exactly when k > 1")
    if not config.n_shared_experts:
        problems.append("n_shared_experts 0: import-hf needs the shared expert")
    groups, kept = config.n_group or 1, config.topk_group or 1
    if (groups, kept) != (1, 1) and topk != 2 * kept:
        problems.append(f"num_experts_per_tok {topk} with topk_group {kept}: megatron-core scores a group by its "
                        f"top-k / topk_group best experts, transformers by its 2 best")
    if getattr(config, "num_nextn_predict_layers", 0):
        problems.append(f"num_nextn_predict_layers {config.num_nextn_predict_layers}: multi-token prediction "
                        "modules are not imported")
    return problems


def import_problems(config) -> list[str]:
    problems = c.import_problems(config)
    if config.rms_norm_eps != LATENT_NORM_EPSILON:
        problems.append(f"rms_norm_eps {config.rms_norm_eps:g}: the job normalises the latents with the same "
                        f"epsilon as the other norms, transformers with {LATENT_NORM_EPSILON:g}")
    if not config.rope_interleave:
        problems.append("rope_interleave false: megatron-core's latent attention uses DeepSeek's interleaved rope")
    return problems + routing_import_problems(config, config.num_experts_per_tok)


def routing_flags(config) -> list:
    """The job's flags of DeepSeek-style routing and the dense layers first (shared with GLM-4.5)."""
    layers, dense = config.num_hidden_layers, config.first_k_dense_replace or 0
    out = ["--moe-layer-freq", str([0] * dense + [1] * (layers - dense)), "--moe-router-score-function", "sigmoid",
           "--moe-router-enable-expert-bias",
           "--moe-shared-expert-intermediate-size", config.n_shared_experts * config.moe_intermediate_size]
    if config.routed_scaling_factor != 1.0:
        out += ["--moe-router-topk-scaling-factor", config.routed_scaling_factor]
    if (config.n_group or 1, config.topk_group or 1) != (1, 1):
        out += ["--moe-router-num-groups", config.n_group, "--moe-router-group-topk", config.topk_group]
    return out


def flags(config) -> list:
    out = c.common_flags(config, config.n_routed_experts, config.moe_intermediate_size, config.intermediate_size)
    out += ["--qk-layernorm", "--multi-latent-attention", "--kv-lora-rank", config.kv_lora_rank,
            "--qk-head-dim", config.qk_nope_head_dim, "--qk-pos-emb-head-dim", config.qk_rope_head_dim,
            "--v-head-dim", config.v_head_dim, *routing_flags(config)]
    if config.q_lora_rank is not None:
        out += ["--q-lora-rank", config.q_lora_rank]
    return out


def latent_attention(args, layer: int, src: str, dst: str) -> list:
    """megatron-core's ``MLASelfAttention``: the same layouts as DeepSeek's (each head's query and key
    ``[no-rope part, rope part]``, the key/value latent ``[latent, rope part]``, the up projection per head
    ``[key, value]``), tensor for tensor."""
    hidden, heads = c.hidden(args), args.num_attention_heads
    query = dim(heads * (args.qk_head_dim + args.qk_pos_emb_head_dim),
                "num_attention_heads x (qk_nope_head_dim + qk_rope_head_dim)")
    latent = dim(args.kv_lora_rank, "kv_lora_rank")
    attention, target = f"{src}self_attention.", f"{dst}self_attn."
    shapes = {"linear_proj": ("o_proj", (hidden, dim(heads * args.v_head_dim, "num_attention_heads x v_head_dim")))}
    if args.q_lora_rank is None:
        shapes["linear_q_proj"] = ("q_proj", (query, hidden))
    else:
        rank = dim(args.q_lora_rank, "q_lora_rank")
        shapes.update(linear_q_down_proj=("q_a_proj", (rank, hidden)), q_layernorm=("q_a_layernorm", (rank,)),
                      linear_q_up_proj=("q_b_proj", (query, rank)))
    shapes.update(
        linear_kv_down_proj=("kv_a_proj_with_mqa", (dim(args.kv_lora_rank + args.qk_pos_emb_head_dim,
                                                        "kv_lora_rank + qk_rope_head_dim"), hidden)),
        kv_layernorm=("kv_a_layernorm", (latent,)),
        linear_kv_up_proj=("kv_b_proj", (dim(heads * (args.qk_head_dim + args.v_head_dim),
                                             "num_attention_heads x (qk_nope_head_dim + v_head_dim)"), latent)))
    return [Same(f"{attention}{name}.weight", f"{target}{hf}.weight", shape, layer)
            for name, (hf, shape) in shapes.items()]


def moe_mlp(args, layer: int, src: str, dst: str) -> list:
    bias = "required" if c.get(args, "moe_router_enable_expert_bias", False) else "zeros"
    return (c.routed_experts(args, layer, src, dst, experts_key="n_routed_experts", expert_bias=bias)
            + c.shared_expert(args, layer, src, dst, "mlp.shared_experts.", "n_shared_experts x moe_intermediate_size"))


def mappings(args, vocab_size: int) -> list:
    pattern = c.moe_pattern(args)

    def mlp(layer, src, dst):
        return moe_mlp(args, layer, src, dst) if pattern[layer] else c.dense_mlp(args, layer, src, dst)

    return c.decoder_mappings(args, vocab_size, lambda layer, src, dst: latent_attention(args, layer, src, dst), mlp)


FAMILY = Family(NAME, TITLE, ARCHITECTURE, export_problems, config, import_problems, flags, mappings)
