"""The Hugging Face targets: what each represents, its ``config.json`` from the main job's flags, and the flags
of a ``transformers`` config.

A target represents a model when ``transformers``' modelling code computes what megatron-core computes, to
fp32 rounding. What it cannot represent is refused before anything is written, every problem at once, each
named by its main-job flag and value (:class:`HfExportError`); ``import-hf`` refuses the ``config.json``
fields the job cannot build the same way (:class:`HfImportError`).

- ``qwen3_moe`` (``Qwen3MoeForCausalLM``): rope attention with q/k RMSNorm per head and grouped-query
  attention; softmax routing, the top-k gates renormalised (``norm_topk_prob``) or not (megatron-core's
  pre-softmax, and any top-1); no shared expert, no expert bias, no group limit, no gate scaling; dense layers
  anywhere (``mlp_only_layers``).
- ``deepseek_v3`` (``DeepseekV3ForCausalLM``): multi-head latent attention (DeepSeek's interleaved rope on
  each head's rope part, the latents RMS-normalised with epsilon 1e-6); sigmoid routing with the
  aux-loss-free bias (``e_score_correction_bias``), gates renormalised when k > 1 and scaled
  (``routed_scaling_factor``); group-limited top-k where a group scores the sum of its 2 best experts (so top-k
  = 2 x the groups kept); one shared expert of a multiple of the expert width; the dense layers first
  (``first_k_dense_replace``).
"""

from __future__ import annotations

import argparse

from granular_moe.config import GranularMoEConfigError

TARGETS = ("qwen3_moe", "deepseek_v3")
ARCHITECTURES = {"qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
TARGET_NAMES = {"qwen3_moe": "Qwen3-MoE", "deepseek_v3": "DeepSeek-V3"}
# transformers' DeepseekV3 builds its q/kv latent norms with the RMSNorm default epsilon, not rms_norm_eps
DEEPSEEK_LATENT_NORM_EPSILON = 1e-6


class HfConversionError(GranularMoEConfigError):
    """A model that cannot be converted between the main job and a Hugging Face target."""


class HfExportError(HfConversionError):
    """The checkpoint's model cannot be written as the target: the message names every option the target
    cannot represent (its main-job flag, its value, the target). Raised before anything is written."""


class HfImportError(HfConversionError):
    """The Hugging Face model cannot be built by the main job: the message names every ``config.json`` field
    it cannot represent. Raised before anything is written."""


# --------------------------------------------------------------------------- reading the job's flags


def _get(args, name: str, default=None):
    value = getattr(args, name, default)
    return default if value is None else value


def granularity(args) -> int:
    return _get(args, "moe_granularity", 1) if getattr(args, "moe_granularity_applied", False) else 1


def moe_pattern(args) -> list[int]:
    """1 for each MoE layer, 0 for each dense one (megatron-core's reading of ``--moe-layer-freq``)."""
    layers = args.num_layers
    if not _get(args, "num_experts", 0):
        return [0] * layers
    freq = _get(args, "moe_layer_freq", 1)
    if isinstance(freq, int):
        return [1 if layer % freq == 0 else 0 for layer in range(layers)]
    return list(freq)


def pre_softmax(args) -> bool:
    """Whether softmax routing takes the softmax over all experts first (gates not renormalised): the flag,
    or top-1 routing, which the main job always routes so (:func:`granular_moe.training.model`)."""
    return bool(_get(args, "moe_router_pre_softmax", False)) or args.moe_router_topk == 1


def ffn_hidden_size(args) -> int:
    from granular_moe.megatron.arguments import megatron_default_ffn_hidden_size

    return args.ffn_hidden_size or megatron_default_ffn_hidden_size(args.hidden_size, args.swiglu)


def head_dim(args) -> int:
    return _get(args, "kv_channels") or args.hidden_size // args.num_attention_heads


def _given_topk(args) -> str:
    g = granularity(args)
    return f"{args.moe_router_topk}" if g == 1 else f"{args.moe_router_topk // g} (x --moe-granularity {g})"


# --------------------------------------------------------------------------- what a target represents


def _common_problems(args, name: str) -> list[str]:
    problems = []
    if not _get(args, "num_experts", 0):
        problems.append(f"--num-experts unset: a dense model; {name} is a mixture of experts")
        return problems
    if _get(args, "moe_router_type", "token_choice") != "token_choice":
        problems.append(f"--moe-router-type {args.moe_router_type}: {name} routes each token to its top-k "
                        "experts (token choice)")
    if not args.swiglu:
        problems.append(f"--swiglu not set (GELU experts and MLPs): {name} has SwiGLU MLPs")
    if args.position_embedding_type != "rope":
        problems.append(f"--position-embedding-type {args.position_embedding_type}: {name} uses rope")
    if args.normalization != "RMSNorm":
        problems.append(f"--normalization {args.normalization}: {name} uses RMSNorm")
    if _get(args, "moe_expert_capacity_factor") is not None:
        problems.append(f"--moe-expert-capacity-factor {args.moe_expert_capacity_factor:g}: {name} is dropless")
    if _get(args, "moe_shared_expert_gate", False):
        problems.append(f"--moe-shared-expert-gate: {name} has no gate on the shared expert")
    return problems


def _qwen3_problems(args) -> list[str]:
    name = TARGET_NAMES["qwen3_moe"]
    problems = _common_problems(args, name)
    if not _get(args, "num_experts", 0):
        return problems
    if _get(args, "multi_latent_attention", False):
        problems.append(f"--multi-latent-attention: {name} has grouped-query attention, not latent attention")
    if not _get(args, "qk_layernorm", False):
        problems.append(f"--qk-layernorm not set: {name} RMS-normalises every query and key head")
    score = _get(args, "moe_router_score_function", "softmax")
    if score != "softmax":
        problems.append(f"--moe-router-score-function {score}: {name} routes with softmax scores")
    if _get(args, "moe_router_enable_expert_bias", False):
        problems.append(f"--moe-router-enable-expert-bias: {name} has no expert bias")
    if _get(args, "moe_router_group_topk") or _get(args, "moe_router_num_groups"):
        problems.append(f"--moe-router-num-groups {_get(args, 'moe_router_num_groups')} / --moe-router-group-topk "
                        f"{_get(args, 'moe_router_group_topk')}: {name} has no group-limited routing")
    scaling = _get(args, "moe_router_topk_scaling_factor")
    if scaling not in (None, 1.0):
        problems.append(f"--moe-router-topk-scaling-factor {scaling:g}: {name} does not scale the gates")
    if _get(args, "moe_shared_expert_intermediate_size"):
        problems.append(f"--moe-shared-expert-intermediate-size {args.moe_shared_expert_intermediate_size}: "
                        f"{name} has no shared expert")
    return problems


def _deepseek_problems(args) -> list[str]:
    name = TARGET_NAMES["deepseek_v3"]
    problems = _common_problems(args, name)
    if not _get(args, "num_experts", 0):
        return problems
    if not _get(args, "multi_latent_attention", False):
        problems.append(f"--multi-latent-attention not set: {name}'s attention is multi-head latent attention")
    elif not _get(args, "qk_layernorm", False):
        problems.append(f"--qk-layernorm not set: {name} RMS-normalises the query and key/value latents")
    epsilon = _get(args, "norm_epsilon", 1e-5)
    if epsilon != DEEPSEEK_LATENT_NORM_EPSILON:
        problems.append(f"--norm-epsilon {epsilon:g}: {name} normalises its latents with epsilon "
                        f"{DEEPSEEK_LATENT_NORM_EPSILON:g} whatever rms_norm_eps says; train with --norm-epsilon 1e-6")
    score = _get(args, "moe_router_score_function", "softmax")
    if score != "sigmoid":
        problems.append(f"--moe-router-score-function {score}: {name} routes with sigmoid scores")
    topk, experts = args.moe_router_topk, args.num_experts
    group_topk = _get(args, "moe_router_group_topk")
    if group_topk:
        groups = _get(args, "moe_router_num_groups", 1)
        if topk != 2 * group_topk:
            problems.append(f"--moe-router-topk {_given_topk(args)} = top-{topk} with --moe-router-group-topk "
                            f"{group_topk}: {name} scores a group by its 2 best experts, megatron-core by its "
                            f"top-k / group-topk = {topk / group_topk:g}; they agree only for top-k = 2 x group-topk")
        if experts // groups < 2:
            problems.append(f"--moe-router-num-groups {groups}: {name} needs 2 or more experts per group")
    shared = _get(args, "moe_shared_expert_intermediate_size")
    if not shared:
        problems.append(f"--moe-shared-expert-intermediate-size unset: {name} has a shared expert")
    elif shared % args.moe_ffn_hidden_size:
        problems.append(f"--moe-shared-expert-intermediate-size {shared}: {name}'s shared expert is a whole number "
                        f"of routed experts wide ({args.moe_ffn_hidden_size} each)")
    pattern = moe_pattern(args)
    dense = pattern.count(0)
    if pattern != [0] * dense + [1] * (len(pattern) - dense):
        problems.append(f"--moe-layer-freq {args.moe_layer_freq}: {name} has its dense layers first "
                        "(first_k_dense_replace), then MoE layers only")
    return problems


def export_problems(args, target: str) -> list[str]:
    """What ``target`` cannot represent of the model the (checkpoint's) flags ``args`` describe."""
    if target not in TARGETS:
        raise HfExportError(f"--target {target!r} is not valid; valid values: auto, {', '.join(TARGETS)}")
    return _qwen3_problems(args) if target == "qwen3_moe" else _deepseek_problems(args)


def choose_target(args, requested: str = "auto") -> str:
    """The target to write: ``requested``, checked, or with ``auto`` the first target that represents the
    model. Raises :class:`HfExportError` naming every problem (with ``auto``, every target's)."""
    if requested != "auto":
        problems = export_problems(args, requested)
        if problems:
            raise HfExportError(f"cannot export as {requested} ({TARGET_NAMES[requested]}):\n  - "
                                + "\n  - ".join(problems))
        return requested
    reasons = {}
    for target in TARGETS:
        reasons[target] = export_problems(args, target)
        if not reasons[target]:
            return target
    lines = ["no Hugging Face target represents this model (--target auto):"]
    for target, problems in reasons.items():
        lines.append(f"  {target} ({TARGET_NAMES[target]}):")
        lines += [f"    - {problem}" for problem in problems]
    raise HfExportError("\n".join(lines))


# --------------------------------------------------------------------------- config.json


def hf_config(args, target: str, vocab_size: int, special_ids: dict, dtype: str):
    """The ``transformers`` config of the model ``args`` describe (checked by :func:`choose_target`)."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=ffn_hidden_size(args),
        moe_intermediate_size=args.moe_ffn_hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_experts_per_tok=args.moe_router_topk,
        hidden_act="silu",
        max_position_embeddings=args.max_position_embeddings,
        initializer_range=args.init_method_std,
        rms_norm_eps=_get(args, "norm_epsilon", 1e-5),
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        rope_parameters={"rope_type": "default", "rope_theta": float(args.rotary_base)},
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=special_ids.get("bos"),
        eos_token_id=special_ids.get("eos"),
        pad_token_id=special_ids.get("pad"),
        architectures=[ARCHITECTURES[target]],
        dtype=dtype,
    )
    coeff = _get(args, "moe_aux_loss_coeff", 0.0)
    if target == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        heads = args.num_attention_heads
        return Qwen3MoeConfig(
            **common,
            num_key_value_heads=args.num_query_groups if _get(args, "group_query_attention", False) else heads,
            head_dim=head_dim(args),
            use_sliding_window=False,
            decoder_sparse_step=1,
            mlp_only_layers=[layer for layer, moe in enumerate(moe_pattern(args)) if not moe],
            num_experts=args.num_experts,
            norm_topk_prob=not pre_softmax(args),
            router_aux_loss_coef=float(coeff[0] if isinstance(coeff, list) else coeff),
        )
    from transformers import DeepseekV3Config

    group_topk = _get(args, "moe_router_group_topk")
    return DeepseekV3Config(
        **common,
        num_key_value_heads=args.num_attention_heads,
        n_routed_experts=args.num_experts,
        n_shared_experts=args.moe_shared_expert_intermediate_size // args.moe_ffn_hidden_size,
        routed_scaling_factor=float(_get(args, "moe_router_topk_scaling_factor", 1.0)),
        n_group=_get(args, "moe_router_num_groups", 1) if group_topk else 1,
        topk_group=group_topk or 1,
        norm_topk_prob=args.moe_router_topk > 1,
        first_k_dense_replace=moe_pattern(args).count(0),
        q_lora_rank=_get(args, "q_lora_rank"),
        kv_lora_rank=args.kv_lora_rank,
        qk_rope_head_dim=args.qk_pos_emb_head_dim,
        qk_nope_head_dim=args.qk_head_dim,
        v_head_dim=args.v_head_dim,
        rope_interleave=True,
        num_nextn_predict_layers=0,
    )


# --------------------------------------------------------------------------- flags of a transformers config


def _import_problems(config) -> list[str]:
    problems = []
    model_type = config.model_type
    if model_type not in TARGETS:
        return [f"model_type {model_type!r}: import-hf reads {', '.join(TARGETS)}"]
    if config.hidden_act != "silu":
        problems.append(f"hidden_act {config.hidden_act!r}: the job's gated MLPs are SwiGLU (silu)")
    if config.attention_bias:
        problems.append("attention_bias true: the job has no linear biases")
    rope = dict(config.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_parameters.rope_type {rope.get('rope_type')!r}: the job has plain rope only")
    theta = rope.get("rope_theta", 10000.0)
    if float(theta) != int(theta):
        problems.append(f"rope_parameters.rope_theta {theta}: --rotary-base is an integer")
    topk = config.num_experts_per_tok
    if model_type == "qwen3_moe":
        if getattr(config, "use_sliding_window", False):
            problems.append("use_sliding_window true: the job attends to the whole sequence")
        if topk == 1 and config.norm_topk_prob:
            problems.append("num_experts_per_tok 1 with norm_topk_prob true: every gate would be 1; megatron-core "
                            "routes top-1 with the expert's probability")
        return problems
    if config.rms_norm_eps != DEEPSEEK_LATENT_NORM_EPSILON:
        problems.append(f"rms_norm_eps {config.rms_norm_eps:g}: the job normalises the latents with the same "
                        f"epsilon as the other norms, transformers with {DEEPSEEK_LATENT_NORM_EPSILON:g}")
    if not config.rope_interleave:
        problems.append("rope_interleave false: megatron-core's latent attention uses DeepSeek's interleaved rope")
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


def flags_from_hf(config) -> list[str]:
    """The main job's model flags for the ``transformers`` config (granularity 1: the config's experts are
    the job's experts). Raises :class:`HfImportError` naming every field the job cannot represent."""
    problems = _import_problems(config)
    if problems:
        raise HfImportError(f"cannot import this {config.model_type} model:\n  - " + "\n  - ".join(problems))
    layers = config.num_hidden_layers
    flags = [
        "--num-layers", layers, "--hidden-size", config.hidden_size, "--ffn-hidden-size", config.intermediate_size,
        "--num-attention-heads", config.num_attention_heads, "--swiglu", "--normalization", "RMSNorm",
        "--norm-epsilon", config.rms_norm_eps, "--position-embedding-type", "rope",
        "--rotary-base", int(config.rope_parameters.get("rope_theta", 10000.0)),
        "--max-position-embeddings", config.max_position_embeddings, "--init-method-std", config.initializer_range,
        "--disable-bias-linear", "--qk-layernorm", "--num-experts", config.num_local_experts,
        "--moe-ffn-hidden-size", config.moe_intermediate_size, "--moe-router-topk", config.num_experts_per_tok,
        "--moe-granularity", 1,
    ]
    if not config.tie_word_embeddings:
        flags.append("--untie-embeddings-and-output-weights")
    if config.model_type == "qwen3_moe":
        pattern = [int(layer not in config.mlp_only_layers and (layer + 1) % config.decoder_sparse_step == 0)
                   for layer in range(layers)]
        head = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        flags += ["--kv-channels", head, "--moe-layer-freq", str(pattern),
                  "--moe-aux-loss-coeff", config.router_aux_loss_coef]
        if config.num_key_value_heads != config.num_attention_heads:
            flags += ["--group-query-attention", "--num-query-groups", config.num_key_value_heads]
        if not config.norm_topk_prob:
            flags.append("--moe-router-pre-softmax")
    else:
        dense = config.first_k_dense_replace or 0
        flags += [
            "--multi-latent-attention", "--kv-lora-rank", config.kv_lora_rank,
            "--qk-head-dim", config.qk_nope_head_dim, "--qk-pos-emb-head-dim", config.qk_rope_head_dim,
            "--v-head-dim", config.v_head_dim, "--moe-layer-freq", str([0] * dense + [1] * (layers - dense)),
            "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
            "--moe-shared-expert-intermediate-size", config.n_shared_experts * config.moe_intermediate_size,
        ]
        if config.q_lora_rank is not None:
            flags += ["--q-lora-rank", config.q_lora_rank]
        if config.routed_scaling_factor != 1.0:
            flags += ["--moe-router-topk-scaling-factor", config.routed_scaling_factor]
        if (config.n_group or 1, config.topk_group or 1) != (1, 1):
            flags += ["--moe-router-num-groups", config.n_group, "--moe-router-group-topk", config.topk_group]
    return [str(flag) for flag in flags]


def parse_model_flags(flags: list[str]) -> argparse.Namespace:
    """The main job's namespace for ``flags`` (fp32, one process), as :func:`parse_args` gives it."""
    from granular_moe.training.arguments import parse_args

    return parse_args(flags + ["--fp32"])
