"""What the families share: reading the job's flags, the checks every family makes (each problem named by
its main-job flag and value), the ``config.json`` fields they all have, and the mappings of the parts they
build alike (embedding, norms, grouped-query attention, gated MLPs, routed and shared experts).

A family represents a model when ``transformers``' modelling code computes what megatron-core computes, to
fp32 rounding; everything else is refused before anything is written.
"""

from __future__ import annotations

import torch

from granular_moe.hf.mappings import QKV, Experts, Gated, Mapping, Same, Zeros, dim

# --------------------------------------------------------------------------- reading the job's flags


def get(args, name: str, default=None):
    value = getattr(args, name, default)
    return default if value is None else value


def granularity(args) -> int:
    return get(args, "moe_granularity", 1) if getattr(args, "moe_granularity_applied", False) else 1


def moe_pattern(args) -> list[int]:
    """1 for each MoE layer, 0 for each dense one (megatron-core's reading of ``--moe-layer-freq``)."""
    layers = args.num_layers
    if not get(args, "num_experts", 0):
        return [0] * layers
    freq = get(args, "moe_layer_freq", 1)
    if isinstance(freq, int):
        return [1 if layer % freq == 0 else 0 for layer in range(layers)]
    return list(freq)


def pre_softmax(args) -> bool:
    """Whether softmax routing takes the softmax over all experts first (gates not renormalised): the flag,
    or top-1 routing, which the main job always routes so (:func:`granular_moe.training.model`)."""
    return bool(get(args, "moe_router_pre_softmax", False)) or args.moe_router_topk == 1


def ffn_hidden_size(args) -> int:
    from granular_moe.megatron.arguments import megatron_default_ffn_hidden_size

    return args.ffn_hidden_size or megatron_default_ffn_hidden_size(args.hidden_size, args.swiglu)


def head_dim(args) -> int:
    return get(args, "kv_channels") or args.hidden_size // args.num_attention_heads


def query_groups(args) -> int:
    return args.num_query_groups if get(args, "group_query_attention", False) else args.num_attention_heads


def rotary_percent(args) -> float:
    return float(get(args, "rotary_percent", 1.0))


def qk_norm(args) -> str:
    """How the job normalises queries and keys: ``none``, ``head`` (each head, megatron-core's
    ``--qk-layernorm``) or ``projection`` (the whole projection, ``--qk-layernorm-across-heads``)."""
    if not get(args, "qk_layernorm", False):
        return "none"
    return "projection" if get(args, "qk_layernorm_across_heads", False) else "head"


def given_topk(args) -> str:
    g = granularity(args)
    return f"{args.moe_router_topk}" if g == 1 else f"{args.moe_router_topk // g} (x --moe-granularity {g})"


def dense_layers(args) -> list[int]:
    """The dense layers' indices (Qwen's ``mlp_only_layers``)."""
    return [layer for layer, moe in enumerate(moe_pattern(args)) if not moe]


def aux_loss_coeff(args) -> float:
    coeff = get(args, "moe_aux_loss_coeff", 0.0)
    return float(coeff[0] if isinstance(coeff, list) else coeff)


# --------------------------------------------------------------------------- what a family represents


def base_problems(args, name: str) -> list[str]:
    """What no family represents: a dense model, expert-choice routing, GELU, learned positions, LayerNorm,
    token dropping. An empty list for an MoE model, else the problems (the rest is not checked)."""
    if not get(args, "num_experts", 0):
        return [f"--num-experts unset: a dense model; {name} is a mixture of experts"]
    problems = []
    if get(args, "moe_router_type", "token_choice") != "token_choice":
        problems.append(f"--moe-router-type {args.moe_router_type}: {name} routes each token to its top-k "
                        "experts (token choice)")
    if not args.swiglu:
        problems.append(f"--swiglu not set (GELU experts and MLPs): {name} has SwiGLU MLPs")
    if args.position_embedding_type != "rope":
        problems.append(f"--position-embedding-type {args.position_embedding_type}: {name} uses rope")
    if args.normalization != "RMSNorm":
        problems.append(f"--normalization {args.normalization}: {name} uses RMSNorm")
    if get(args, "moe_expert_capacity_factor") is not None:
        problems.append(f"--moe-expert-capacity-factor {args.moe_expert_capacity_factor:g}: {name} is dropless")
    return problems


def attention_problems(args, name: str, qk_norms: tuple[str, ...], qkv_bias: bool = False,
                       partial_rope: bool = False) -> list[str]:
    """Grouped-query attention: ``qk_norms`` the query/key norms the family can have (``none``, ``head``,
    ``projection``), ``qkv_bias`` whether it can have query/key/value biases, ``partial_rope`` whether rope
    may rotate part of each head."""
    problems = []
    if get(args, "multi_latent_attention", False):
        problems.append(f"--multi-latent-attention: {name} has grouped-query attention, not latent attention")
    norm = qk_norm(args)
    if norm not in qk_norms:
        wanted = {"none": "no query/key norms", "head": "RMS-normalises every query and key head",
                  "projection": "RMS-normalises each token's whole query and key projections (all heads together)"}
        flag = {"none": "--qk-layernorm not set", "head": "--qk-layernorm",
                "projection": "--qk-layernorm --qk-layernorm-across-heads"}[norm]
        problems.append(f"{flag}: {name} " + " or ".join(wanted[n] for n in qk_norms))
    if get(args, "add_qkv_bias", False) and not qkv_bias:
        problems.append(f"--add-qkv-bias: {name} has no query/key/value biases")
    percent = rotary_percent(args)
    if percent != 1.0 and not partial_rope:
        problems.append(f"--rotary-percent {percent:g}: {name} rotates the whole of each head")
    return problems


def softmax_routing_problems(args, name: str) -> list[str]:
    problems = []
    score = get(args, "moe_router_score_function", "softmax")
    if score != "softmax":
        problems.append(f"--moe-router-score-function {score}: {name} routes with softmax scores")
    if get(args, "moe_router_enable_expert_bias", False):
        problems.append(f"--moe-router-enable-expert-bias: {name} has no expert bias")
    if get(args, "moe_router_group_topk") or get(args, "moe_router_num_groups"):
        problems.append(f"--moe-router-num-groups {get(args, 'moe_router_num_groups')} / --moe-router-group-topk "
                        f"{get(args, 'moe_router_group_topk')}: {name} has no group-limited routing")
    scaling = get(args, "moe_router_topk_scaling_factor")
    if scaling not in (None, 1.0):
        problems.append(f"--moe-router-topk-scaling-factor {scaling:g}: {name} does not scale the gates")
    return problems


def sigmoid_routing_problems(args, name: str) -> list[str]:
    """DeepSeek-style routing: sigmoid scores, gates renormalised when k > 1, groups scored by their 2 best."""
    problems = []
    score = get(args, "moe_router_score_function", "softmax")
    if score != "sigmoid":
        problems.append(f"--moe-router-score-function {score}: {name} routes with sigmoid scores")
    topk, experts = args.moe_router_topk, args.num_experts
    group_topk = get(args, "moe_router_group_topk")
    if group_topk:
        groups = get(args, "moe_router_num_groups", 1)
        if topk != 2 * group_topk:
            problems.append(f"--moe-router-topk {given_topk(args)} = top-{topk} with --moe-router-group-topk "
                            f"{group_topk}: {name} scores a group by its 2 best experts, megatron-core by its "
                            f"top-k / group-topk = {topk / group_topk:g}; they agree only for top-k = 2 x group-topk")
        if experts // groups < 2:
            problems.append(f"--moe-router-num-groups {groups}: {name} needs 2 or more experts per group")
    return problems


def shared_expert_problems(args, name: str, *, required: bool, gate: bool, whole_experts: bool = False) -> list[str]:
    """A shared expert: ``required`` (else refused), with a sigmoid gate exactly when ``gate``; its width a
    whole number of routed experts when ``whole_experts``."""
    shared = get(args, "moe_shared_expert_intermediate_size")
    if not required:
        return [f"--moe-shared-expert-intermediate-size {shared}: {name} has no shared expert"] if shared else []
    if not shared:
        return [f"--moe-shared-expert-intermediate-size unset: {name} has a shared expert"]
    problems = []
    has_gate = get(args, "moe_shared_expert_gate", False)
    if has_gate and not gate:
        problems.append(f"--moe-shared-expert-gate: {name} has no gate on the shared expert")
    if gate and not has_gate:
        problems.append(f"--moe-shared-expert-gate not set: {name} gates its shared expert with a sigmoid")
    if whole_experts and shared % args.moe_ffn_hidden_size:
        problems.append(f"--moe-shared-expert-intermediate-size {shared}: {name}'s shared expert is a whole number "
                        f"of routed experts wide ({args.moe_ffn_hidden_size} each)")
    return problems


def dense_layer_problems(args, name: str, where: str) -> list[str]:
    """Dense layers ``anywhere``, only ``first`` (then MoE layers only), or ``none``."""
    pattern = moe_pattern(args)
    dense = pattern.count(0)
    if where == "none" and dense:
        return [f"--moe-layer-freq {args.moe_layer_freq}: {name} has experts in every layer"]
    if where == "first" and pattern != [0] * dense + [1] * (len(pattern) - dense):
        return [f"--moe-layer-freq {args.moe_layer_freq}: {name} has its dense layers first "
                "(first_k_dense_replace), then MoE layers only"]
    return []


def gate_problems(args, name: str, renormalised: bool) -> list[str]:
    """Softmax gates the family always renormalises over the top k (Mixtral): megatron-core's default (the
    top-k logits softmaxed among themselves) and not top-1 (the job routes it pre-softmax)."""
    if not renormalised:
        return []
    if args.moe_router_topk == 1:
        return [f"--moe-router-topk {given_topk(args)} = top-1: {name} renormalises the top-k gates (a top-1 gate "
                "is 1), megatron-core gates top-1 with the expert's probability"]
    if get(args, "moe_router_pre_softmax", False):
        return [f"--moe-router-pre-softmax: {name} renormalises the top-k gates"]
    return []


# --------------------------------------------------------------------------- config.json


def common_config(args, vocab_size: int, special_ids: dict, dtype: str, architecture: str) -> dict:
    """The ``config.json`` fields every family has."""
    rope = {"rope_type": "default", "rope_theta": float(args.rotary_base)}
    return dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_experts_per_tok=args.moe_router_topk,
        hidden_act="silu",
        max_position_embeddings=args.max_position_embeddings,
        initializer_range=args.init_method_std,
        rms_norm_eps=get(args, "norm_epsilon", 1e-5),
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        rope_parameters=rope,
        attention_dropout=0.0,
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
        architectures=[architecture],
        dtype=dtype,
    )


def import_problems(config, *, bias_key: str | None = "attention_bias", partial_rope: bool = False) -> list[str]:
    """What the job cannot build of any family's ``config.json``: another activation, the biases ``bias_key``
    switches on (None: the family's biases are the query/key/value ones the job builds with --add-qkv-bias),
    rope scaling, a non-integer rope base, partial rope where the family's code has none."""
    problems = []
    if config.hidden_act != "silu":
        problems.append(f"hidden_act {config.hidden_act!r}: the job's gated MLPs are SwiGLU (silu)")
    if bias_key and getattr(config, bias_key, False):
        problems.append(f"{bias_key} true: the job has no linear biases")
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_parameters.rope_type {rope.get('rope_type')!r}: the job has plain rope only")
    theta = rope.get("rope_theta", 10000.0)
    if float(theta) != int(theta):
        problems.append(f"rope_parameters.rope_theta {theta}: --rotary-base is an integer")
    factor = rope.get("partial_rotary_factor", 1.0)
    if factor != 1.0 and not partial_rope:
        problems.append(f"rope_parameters.partial_rotary_factor {factor}: the model's code rotates whole heads")
    return problems


def renormalised_top1_problems(config) -> list[str]:
    """``norm_topk_prob`` with top-1 (Qwen3-MoE, Qwen2-MoE, OLMoE): every gate 1, which the job does not route."""
    if config.num_experts_per_tok == 1 and config.norm_topk_prob:
        return ["num_experts_per_tok 1 with norm_topk_prob true: every gate would be 1; megatron-core routes top-1 "
                "with the expert's probability"]
    return []


def config_head_dim(config) -> int:
    """A ``config.json``'s head width: ``head_dim`` where it has one, else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def common_flags(config, experts: int, expert_width: int, ffn: int) -> list:
    """The main job's flags every family's ``config.json`` gives (granularity 1: its experts are the job's)."""
    flags = [
        "--num-layers", config.num_hidden_layers, "--hidden-size", config.hidden_size, "--ffn-hidden-size", ffn,
        "--num-attention-heads", config.num_attention_heads, "--swiglu", "--normalization", "RMSNorm",
        "--norm-epsilon", config.rms_norm_eps, "--position-embedding-type", "rope",
        "--rotary-base", int(config.rope_parameters.get("rope_theta", 10000.0)),
        "--max-position-embeddings", config.max_position_embeddings, "--init-method-std", config.initializer_range,
        "--disable-bias-linear", "--num-experts", experts, "--moe-ffn-hidden-size", expert_width,
        "--moe-router-topk", config.num_experts_per_tok, "--moe-granularity", 1,
    ]
    if not config.tie_word_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    return flags


def gqa_flags(config, heads_key: str = "num_key_value_heads", head_width=None) -> list:
    flags = []
    if head_width is not None:
        flags += ["--kv-channels", head_width]
    groups = getattr(config, heads_key, None) or config.num_attention_heads
    if groups != config.num_attention_heads:
        flags += ["--group-query-attention", "--num-query-groups", groups]
    return flags


# --------------------------------------------------------------------------- mappings


def hidden(args) -> tuple[int, str]:
    return dim(args.hidden_size, "hidden_size")


def decoder_mappings(args, vocab_size: int, attention, mlp) -> list[Mapping]:
    """The model's mappings in checkpoint order: the embedding, each layer (its input norm, ``attention(layer,
    src, dst)``, the norm before its MLP, ``mlp(layer, src, dst)``), the final norm, an untied output layer."""
    padded = args.padded_vocab_size
    vocab = dim(vocab_size, "vocab_size")
    out: list[Mapping] = [Same("embedding.word_embeddings.weight", "model.embed_tokens.weight", (vocab, hidden(args)),
                               padded_rows=padded)]
    for layer in range(args.num_layers):
        src, dst = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        out.append(Same(src + "input_layernorm.weight", dst + "input_layernorm.weight", (hidden(args),), layer))
        out += attention(layer, src, dst)
        out.append(Same(src + "pre_mlp_layernorm.weight", dst + "post_attention_layernorm.weight", (hidden(args),),
                        layer))
        out += mlp(layer, src, dst)
    out.append(Same("decoder.final_layernorm.weight", "model.norm.weight", (hidden(args),)))
    if args.untie_embeddings_and_output_weights:
        out.append(Same("output_layer.weight", "lm_head.weight", (vocab, hidden(args)), padded_rows=padded))
    return out


def gqa_attention(args, layer: int, src: str, dst: str) -> list[Mapping]:
    """megatron-core's ``SelfAttention`` as ``q/k/v/o_proj`` (with the biases of ``--add-qkv-bias``) and the
    query/key norms: per head (``head_dim`` wide) or over the whole projection."""
    heads, groups, width = args.num_attention_heads, query_groups(args), head_dim(args)
    attention = f"{src}self_attention."
    out: list[Mapping] = [QKV(attention + "linear_qkv.weight", dst + "self_attn.", heads, groups, width, hidden(args),
                              layer)]
    if get(args, "add_qkv_bias", False):
        out.append(QKV(attention + "linear_qkv.bias", dst + "self_attn.", heads, groups, width, hidden(args), layer,
                       bias=True))
    queries = dim(heads * width, "num_attention_heads x head_dim")
    out.append(Same(attention + "linear_proj.weight", dst + "self_attn.o_proj.weight", (hidden(args), queries), layer))
    norm = qk_norm(args)
    if norm == "head":
        q, k = (dim(width, "head_dim"),), (dim(width, "head_dim"),)
    elif norm == "projection":
        q = (dim(heads * width, "hidden_size"),)
        k = (dim(groups * width, "hidden_size / num_attention_heads x num_key_value_heads"),)
    if norm != "none":
        out += [Same(attention + "q_layernorm.weight", dst + "self_attn.q_norm.weight", q, layer),
                Same(attention + "k_layernorm.weight", dst + "self_attn.k_norm.weight", k, layer)]
    return out


def dense_mlp(args, layer: int, src: str, dst: str) -> list[Mapping]:
    return [Gated(src + "mlp.linear_fc1.weight", src + "mlp.linear_fc2.weight", dst + "mlp.",
                  dim(ffn_hidden_size(args), "intermediate_size"), hidden(args), layer)]


def routed_experts(args, layer: int, src: str, dst: str, *, block: str = "mlp.", experts_key: str = "num_experts",
                   width_key: str = "moe_intermediate_size", names=("gate_proj", "up_proj", "down_proj"),
                   expert_bias: str | None = None) -> list[Mapping]:
    """The router (``{block}gate.weight``), DeepSeek's expert bias (``required``: the job's; ``zeros``: the
    job has none) and the routed experts (``{block}experts.{e}.{names}``)."""
    experts = dim(args.num_experts, experts_key)
    out: list[Mapping] = [Same(src + "mlp.router.weight", f"{dst}{block}gate.weight", (experts, hidden(args)), layer)]
    bias = f"{dst}{block}gate.e_score_correction_bias"
    if expert_bias == "required":
        out.append(Same(src + "mlp.router.expert_bias", bias, (experts,), layer, dtype=torch.float32))
    elif expert_bias == "zeros":
        out.append(Zeros(bias, (experts,), torch.float32, layer))
    out.append(Experts(src + "mlp.experts.weight1", src + "mlp.experts.weight2", f"{dst}{block}experts.", experts,
                       dim(args.moe_ffn_hidden_size, width_key), hidden(args), layer, names))
    return out


def shared_expert(args, layer: int, src: str, dst: str, prefix: str, width_key: str) -> list[Mapping]:
    return [Gated(src + "mlp.shared_experts.linear_fc1.weight", src + "mlp.shared_experts.linear_fc2.weight",
                  dst + prefix, dim(args.moe_shared_expert_intermediate_size, width_key), hidden(args), layer)]
