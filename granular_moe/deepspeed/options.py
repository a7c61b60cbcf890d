"""The arguments of :class:`~granular_moe.deepspeed.GranularMoE`: each checked by its own name with the valid values
before anything is built, then turned into the megatron-core ``TransformerConfig`` the granular layer reads.

The layer's own checks (:func:`granular_moe.config.check_layer_config`) name Megatron's flags; the checks here come
first and name ``GranularMoE``'s arguments, so a user of the DeepSpeed layer meets those names only.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from granular_moe.config import DROP_POLICIES, ROUTER_TYPES, GranularMoEConfigError, apply_granularity
from granular_moe.parallel_layout import divisors
from granular_moe.scores import SCORE_FUNCTIONS

# megatron-core's balance losses but the global-batch one, which needs megatron-core's data-parallel group (a
# DeepSpeed job does not initialise it)
AUX_LOSS_TYPES = ("aux_loss", "seq_aux_loss", "none")


def positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GranularMoEConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def check_unsupported(noisy_gate_policy, use_rts, use_tutel, expert_tensor_parallelism, second_expert_sampling):
    """Refuse, by argument name, the features of DeepSpeed's ``MoE`` that GranularMoE does not implement."""
    refused = {
        f"noisy_gate_policy {noisy_gate_policy!r} (valid: None)": noisy_gate_policy not in (None, "None"),
        "use_rts=True (random token selection; over capacity GranularMoE drops by drop_policy)": use_rts,
        "use_tutel=True": use_tutel,
        "enable_expert_tensor_parallelism=True (fine-grained experts are not split)": expert_tensor_parallelism,
        "top2_2nd_expert_sampling=True (GranularMoE routes to the top-k experts without sampling)":
            second_expert_sampling,
    }
    named = [what for what, bad in refused.items() if bad]
    if named:
        raise GranularMoEConfigError("GranularMoE does not support " + "; ".join(named))


@dataclasses.dataclass(frozen=True)
class Routing:
    """GranularMoE's routing arguments."""

    router_type: str = "token_choice"
    score_function: str = "softmax"
    pre_softmax: Optional[bool] = None
    topk_scaling_factor: Optional[float] = None
    expert_bias: bool = False
    bias_update_rate: float = 1e-3
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None
    shared_expert_size: Optional[int] = None
    shared_expert_gate: bool = False
    aux_loss_type: Optional[str] = None
    drop_policy: str = "probs"

    def resolved_aux_loss_type(self) -> str:
        return self.aux_loss_type or ("none" if self.router_type == "expert_choice" else "aux_loss")


def check_options(ffn: int, num_experts, ep_size, k, granularity, routing: Routing, drop_tokens, capacity_factor,
                  eval_capacity_factor, min_capacity) -> None:
    """The sizes and routing options, each refused by its argument name with the valid values."""
    for value, name in ((num_experts, "num_experts"), (ep_size, "ep_size"), (k, "k"), (granularity, "granularity")):
        positive_int(value, name)
    if k > num_experts:
        raise GranularMoEConfigError(f"k {k} is above num_experts {num_experts}; valid values: 1..{num_experts}")
    if ffn % granularity:
        raise GranularMoEConfigError(
            f"granularity {granularity} does not divide the expert FFN hidden size {ffn}; valid values: "
            f"{divisors(ffn)}")
    total, topk = num_experts * granularity, k * granularity
    if total % ep_size:
        raise GranularMoEConfigError(
            f"ep_size {ep_size} does not divide the {total} experts (num_experts {num_experts} x granularity "
            f"{granularity}); valid values: {divisors(total)}")
    aux = routing.resolved_aux_loss_type()
    for value, name, valid in ((routing.router_type, "router_type", ROUTER_TYPES),
                               (aux, "aux_loss_type", AUX_LOSS_TYPES),
                               (routing.drop_policy, "drop_policy", DROP_POLICIES),
                               (routing.score_function, "score_function", SCORE_FUNCTIONS)):
        if value not in valid:
            raise GranularMoEConfigError(f"{name} {value!r} is not valid; valid values: {', '.join(valid)}")
    for value, name in ((capacity_factor, "capacity_factor"), (eval_capacity_factor, "eval_capacity_factor")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise GranularMoEConfigError(f"{name} must be > 0, got {value!r}")
    if isinstance(min_capacity, bool) or not isinstance(min_capacity, int) or min_capacity < 0:
        raise GranularMoEConfigError(f"min_capacity must be an integer >= 0, got {min_capacity!r}")
    if routing.expert_bias and routing.score_function == "softmax":
        raise GranularMoEConfigError("expert_bias=True needs score_function 'sigmoid' or 'sqrtsoftplus' "
                                     "(aux-loss-free balancing as megatron-core does it)")
    if routing.bias_update_rate < 0:
        raise GranularMoEConfigError(f"bias_update_rate must be >= 0, got {routing.bias_update_rate}")
    if routing.pre_softmax is False and topk == 1 and routing.score_function == "softmax":
        raise GranularMoEConfigError("pre_softmax=False with one expert per token (k x granularity = 1) gives every "
                                     "token the gate 1 and the router no gradient; valid: pre_softmax None or True")
    if routing.group_topk or routing.num_groups:
        groups, group_topk = routing.num_groups, routing.group_topk
        if not groups or total % groups:
            raise GranularMoEConfigError(
                f"num_groups {groups} must divide the {total} experts (num_experts x granularity); valid values: "
                f"{divisors(total)}")
        per_group = total // groups
        if not group_topk or not 1 <= group_topk <= groups or topk % group_topk or topk > group_topk * per_group:
            raise GranularMoEConfigError(
                f"group_topk {group_topk} with num_groups {groups} and {topk} experts per token (k x granularity): it "
                f"must lie in 1..{groups}, divide {topk}, and its groups must hold at least {topk} experts "
                f"({total // groups} each)")
    if routing.shared_expert_size is not None:
        positive_int(routing.shared_expert_size, "shared_expert_size")
    elif routing.shared_expert_gate:
        raise GranularMoEConfigError("shared_expert_gate=True needs shared_expert_size")
    if routing.router_type == "expert_choice":
        refused = {"score_function other than 'softmax'": routing.score_function != "softmax",
                   "expert_bias=True": routing.expert_bias, "group_topk": bool(routing.group_topk),
                   f"aux_loss_type {aux!r} (valid: 'none')": aux != "none", "drop_tokens=False": not drop_tokens}
        named = [what for what, bad in refused.items() if bad]
        if named:
            raise GranularMoEConfigError(
                "router_type 'expert_choice' takes capacity_factor's share of the tokens per expert, balanced by "
                "construction, with softmax scores; it does not combine with " + "; ".join(named))


def layer_config(hidden_size: int, spec, num_experts: int, ep_size: int, k: int, granularity: int,
                 dtype: torch.dtype, routing: Routing, capacity_factor: Optional[float]):
    """megatron-core's ``TransformerConfig`` of the base MoE made fine-grained (``apply_granularity``), with the
    routing options; the balance loss configured (coefficient 1, which the layer does not apply: ``l_aux`` goes back
    without it) unless ``none``."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    aux = routing.resolved_aux_loss_type()
    topk = k * granularity
    base = TransformerConfig(
        num_layers=1, hidden_size=hidden_size, num_attention_heads=1, ffn_hidden_size=spec.ffn_hidden_size,
        moe_ffn_hidden_size=spec.ffn_hidden_size, num_moe_experts=num_experts, moe_router_topk=k,
        expert_model_parallel_size=ep_size, activation_func=spec.activation, gated_linear_unit=spec.gated,
        add_bias_linear=False, use_cpu_initialization=True, perform_initialization=False, params_dtype=dtype,
        hidden_dropout=0.0, attention_dropout=0.0, moe_router_pre_softmax=True,
        moe_expert_capacity_factor=capacity_factor, moe_token_drop_policy=routing.drop_policy,
        moe_router_score_function=routing.score_function, moe_router_topk_scaling_factor=routing.topk_scaling_factor,
        moe_router_enable_expert_bias=routing.expert_bias, moe_router_bias_update_rate=routing.bias_update_rate,
        moe_shared_expert_intermediate_size=routing.shared_expert_size,
        moe_shared_expert_gate=routing.shared_expert_gate,
        moe_router_load_balancing_type=aux, moe_aux_loss_coeff=0.0 if aux == "none" else 1.0)
    pre_softmax = topk == 1 if routing.pre_softmax is None else routing.pre_softmax
    fine = apply_granularity(base, granularity, pre_softmax=pre_softmax)
    # groups of the fine-grained experts: megatron-core checks them against the config's experts
    return dataclasses.replace(fine, moe_router_num_groups=routing.num_groups, moe_router_group_topk=routing.group_topk)
