"""Granularity arithmetic and validation.

Granularity ``G = d_ff / d_expert`` cuts every expert of a standard MoE into ``G`` smaller ones: the
fine-grained layer has ``E*G`` experts, routes each token to ``k*G`` of them, and each expert's hidden
size is ``d_ff / G`` (``--moe-ffn-hidden-size / G`` when that flag is given). Active parameters and
FLOPs per token are unchanged; ``G = 1`` is the standard MoE.

Every check raises :class:`GranularMoEConfigError` naming the Megatron flag and its valid values, before
any model is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from granular_moe.parallel_layout import divisors
from granular_moe.scores import SCORE_FUNCTIONS

ROUTER_TYPES = ("token_choice", "expert_choice")
DROP_POLICIES = ("probs", "position")
BALANCE_TYPES = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")


class GranularMoEConfigError(ValueError):
    """An invalid fine-grained MoE configuration; the message names the flag and the valid values."""


@dataclass(frozen=True)
class GranularShape:
    """Fine-grained sizes derived from a standard MoE and a granularity."""

    granularity: int
    num_experts: int
    topk: int
    expert_hidden_size: int
    expert_model_parallel_size: int = 1


def _divisors(n: int) -> str:
    return divisors(n, limit=16)


def _require_int(value, flag: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise GranularMoEConfigError(f"{flag} must be an integer >= {minimum}, got {value!r}")
    return value


def granular_shape(
    *,
    num_experts: int,
    topk: int,
    ffn_hidden_size: int,
    granularity: int = 1,
    moe_ffn_hidden_size: int | None = None,
    expert_model_parallel_size: int = 1,
) -> GranularShape:
    """Derive and validate the fine-grained experts, top-k and expert hidden size.

    ``num_experts``, ``topk`` and the FFN sizes are the *base* (G = 1) values, as a user passes them with
    ``--num-experts``, ``--moe-router-topk`` and ``--ffn-hidden-size`` / ``--moe-ffn-hidden-size``.
    """
    g = _require_int(granularity, "--moe-granularity")
    e = _require_int(num_experts, "--num-experts")
    k = _require_int(topk, "--moe-router-topk")
    ep = _require_int(expert_model_parallel_size, "--expert-model-parallel-size")
    if k > e:
        raise GranularMoEConfigError(
            f"--moe-router-topk {k} is above --num-experts {e} (fine-grained: top-k {k * g} of {e * g} "
            f"experts); valid values: 1..{e}"
        )
    if moe_ffn_hidden_size is not None:
        ffn, ffn_flag = _require_int(moe_ffn_hidden_size, "--moe-ffn-hidden-size"), "--moe-ffn-hidden-size"
    else:
        ffn, ffn_flag = _require_int(ffn_hidden_size, "--ffn-hidden-size"), "--ffn-hidden-size"
    if ffn % g:
        raise GranularMoEConfigError(
            f"--moe-granularity {g} does not divide {ffn_flag} {ffn}; valid values: {_divisors(ffn)}"
        )
    if (e * g) % ep:
        raise GranularMoEConfigError(
            f"--num-experts {e} x --moe-granularity {g} = {e * g} experts are not divisible by "
            f"--expert-model-parallel-size {ep}; valid values: {_divisors(e * g)}"
        )
    return GranularShape(
        granularity=g,
        num_experts=e * g,
        topk=k * g,
        expert_hidden_size=ffn // g,
        expert_model_parallel_size=ep,
    )


def apply_granularity(config, granularity: int, pre_softmax: bool | None = None):
    """Return a copy of a megatron-core ``TransformerConfig`` with its MoE fields made fine-grained.

    ``config`` holds the base MoE (``num_moe_experts=E``, ``moe_router_topk=k``, expert size ``d_ff``); the
    result holds ``E*G``, ``k*G`` and ``d_ff/G``: exactly what ``--moe-granularity G`` does to a Megatron job.

    ``pre_softmax``: ``moe_router_pre_softmax`` of the result. By default the config's, except for a base
    top-1 softmax router, which megatron-core only accepts with pre-softmax: there the result (top ``G``) takes
    pre-softmax off, so its gates are renormalised as with ``--moe-granularity G`` in a Megatron-LM job (whose
    top-k is made fine-grained before megatron-core checks it). Pass ``pre_softmax=True`` to keep it.
    """
    if config.num_moe_experts is None:
        raise GranularMoEConfigError("--moe-granularity needs an MoE model: set --num-experts (>= 1)")
    # TransformerConfig fills an unset --moe-ffn-hidden-size with --ffn-hidden-size: name the latter then
    expert_size_given = config.moe_ffn_hidden_size != config.ffn_hidden_size
    shape = granular_shape(
        num_experts=config.num_moe_experts,
        topk=config.moe_router_topk,
        ffn_hidden_size=config.ffn_hidden_size,
        moe_ffn_hidden_size=config.moe_ffn_hidden_size if expert_size_given else None,
        granularity=granularity,
        expert_model_parallel_size=config.expert_model_parallel_size,
    )
    if pre_softmax is None:
        forced = config.moe_router_topk == 1 and config.moe_router_score_function == "softmax"
        pre_softmax = config.moe_router_pre_softmax and not (forced and shape.topk > 1)
    return dataclasses.replace(
        config,
        num_moe_experts=shape.num_experts,
        moe_router_topk=shape.topk,
        moe_ffn_hidden_size=shape.expert_hidden_size,
        moe_router_pre_softmax=pre_softmax,
    )


def check_layer_config(config, router_type: str) -> None:
    """Reject, by flag name, the fine-grained values and Megatron MoE features this layer cannot honour."""
    if router_type not in ROUTER_TYPES:
        raise GranularMoEConfigError(
            f"--moe-router-type {router_type!r} is not valid; valid values: {', '.join(ROUTER_TYPES)}"
        )
    if config.num_moe_experts is None:
        raise GranularMoEConfigError("GranularMoELayer needs --num-experts (num_moe_experts) >= 1")
    granular_shape(
        num_experts=config.num_moe_experts,
        topk=config.moe_router_topk,
        ffn_hidden_size=config.ffn_hidden_size,
        moe_ffn_hidden_size=config.moe_ffn_hidden_size,
        expert_model_parallel_size=config.expert_model_parallel_size,
    )
    if config.moe_token_drop_policy not in DROP_POLICIES:
        raise GranularMoEConfigError(
            f"--moe-token-drop-policy {config.moe_token_drop_policy!r} is not valid; "
            f"valid values: {', '.join(DROP_POLICIES)}"
        )
    if config.moe_expert_capacity_factor is not None and config.moe_expert_capacity_factor <= 0:
        raise GranularMoEConfigError(
            f"--moe-expert-capacity-factor must be > 0 (or unset for dropless), "
            f"got {config.moe_expert_capacity_factor}"
        )
    check_routing_config(config, router_type)
    unsupported = {
        "--disable-bias-linear is required (expert and router biases)": config.add_bias_linear,
        "--expert-tensor-parallel-size must be 1": (config.expert_tensor_parallel_size or 1) != 1,
        "--moe-pad-expert-input-to-capacity is not supported": config.moe_pad_expert_input_to_capacity,
        "--moe-latent-size is not supported": config.moe_latent_size is not None,
        "--moe-input-jitter-eps is not supported": config.moe_input_jitter_eps is not None,
        "--context-parallel-size must be 1": (config.context_parallel_size or 1) != 1,
        "--moe-router-force-load-balancing is not supported": config.moe_router_force_load_balancing,
        "--moe-apply-probs-on-input is not supported": config.moe_apply_probs_on_input,
        "--moe-shared-expert-overlap is not supported (the shared expert runs while tokens travel with "
        "the alltoall dispatcher's asynchronous exchange instead)": config.moe_shared_expert_overlap,
    }
    problems = [msg for msg, bad in unsupported.items() if bad]
    if problems:
        raise GranularMoEConfigError("GranularMoELayer: " + "; ".join(problems))


def balance_coefficients(config) -> dict:
    """``{type: coefficient}`` of the configured load-balancing losses with a coefficient above 0."""
    types, coefficients = config.moe_router_load_balancing_type, config.moe_aux_loss_coeff
    if isinstance(types, (list, tuple)):
        if not isinstance(coefficients, (list, tuple)) or len(coefficients) != len(types):
            raise GranularMoEConfigError(
                f"--moe-router-load-balancing-type lists {len(types)} types: give --moe-aux-loss-coeff a list of "
                f"{len(types)} coefficients, one per type (got {coefficients!r})"
            )
        pairs = list(zip(types, coefficients))
    else:
        if isinstance(coefficients, (list, tuple)):
            raise GranularMoEConfigError(
                f"--moe-aux-loss-coeff is a list ({coefficients!r}) but --moe-router-load-balancing-type is one "
                f"type ({types!r}): give one coefficient, or one type per coefficient"
            )
        pairs = [(types, coefficients)]
    for kind, _ in pairs:
        if kind not in BALANCE_TYPES:
            raise GranularMoEConfigError(
                f"--moe-router-load-balancing-type {kind!r} is not supported by the granular layer; valid values: "
                f"{', '.join(BALANCE_TYPES)}"
            )
    return {kind: float(coefficient) for kind, coefficient in pairs if kind != "none" and coefficient}


def check_routing_config(config, router_type: str) -> None:
    """Megatron's routing options as the granular routers take them: each valid combination accepted, each
    other one refused naming its flags and the valid values."""
    score_function = config.moe_router_score_function
    if score_function not in SCORE_FUNCTIONS:
        raise GranularMoEConfigError(
            f"--moe-router-score-function {score_function!r} is not valid; valid values: {', '.join(SCORE_FUNCTIONS)}"
        )
    coefficients = balance_coefficients(config)
    if config.moe_router_enable_expert_bias and score_function == "softmax":
        raise GranularMoEConfigError(
            "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid or sqrtsoftplus "
            "(megatron-core's aux-loss-free balancing)"
        )
    if config.moe_router_bias_update_rate is not None and config.moe_router_bias_update_rate < 0:
        raise GranularMoEConfigError(
            f"--moe-router-bias-update-rate must be >= 0, got {config.moe_router_bias_update_rate}")
    groups, group_topk, topk = config.moe_router_num_groups, config.moe_router_group_topk, config.moe_router_topk
    if group_topk:
        experts = config.num_moe_experts
        if not groups or experts % groups:
            raise GranularMoEConfigError(
                f"--moe-router-group-topk {group_topk} needs --moe-router-num-groups dividing the {experts} experts "
                f"(--num-experts x --moe-granularity); valid values: {_divisors(experts)}"
            )
        if not 1 <= group_topk <= groups or topk % group_topk or topk > group_topk * (experts // groups):
            raise GranularMoEConfigError(
                f"--moe-router-group-topk {group_topk} with --moe-router-num-groups {groups} and top-k {topk}: "
                f"it must lie in 1..{groups}, divide the top-k (each chosen group contributes top-k / group-topk "
                f"scores) and its groups must hold at least top-k experts ({experts // groups} each)"
            )
    if router_type == "expert_choice":
        refused = {
            "--moe-router-score-function sigmoid/sqrtsoftplus": score_function != "softmax",
            "--moe-router-enable-expert-bias": config.moe_router_enable_expert_bias,
            "--moe-router-group-topk": bool(group_topk),
            "a load-balancing loss (--moe-aux-loss-coeff > 0; set it to 0 or --moe-router-load-balancing-type "
            "none)": bool(coefficients),
        }
        named = [flag for flag, present in refused.items() if present]
        if named:
            raise GranularMoEConfigError(
                "--moe-router-type expert_choice balances loads by construction (each expert takes the same number "
                "of tokens) and scores by softmax; it does not combine with " + "; ".join(named)
            )
