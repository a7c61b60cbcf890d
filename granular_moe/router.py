"""Routers: token choice (each token takes its top-k experts) and expert choice (each expert takes its
top-C tokens), with the Switch load-balancing loss and the z-loss.

Both return a :class:`Routing`: the kept (token, expert, gate) assignments in token-major order, the
layout every dispatcher and kernel of this package consumes. Losses reach the backward pass the way
Megatron's router does it: attached with ``MoEAuxLossAutoScaler`` to a tensor on the output path, scaled by
the schedule's loss scale, and recorded in Megatron's aux-loss tracker under its names
(``load_balancing_loss``, ``z_loss``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker

from granular_moe.config import GranularMoEConfigError


class RouterLogitsError(FloatingPointError):
    """Router logits hold NaN or Inf: training has diverged before this layer."""


@dataclass
class Routing:
    """Kept (token, expert) assignments, grouped by token, experts ascending within a token.

    Token ``t`` owns assignments ``token_offsets[t]:token_offsets[t + 1]``; a token with none (all its
    assignments dropped, or chosen by no expert) gets a zero output.
    """

    expert_index: torch.Tensor  # [A] int64
    weight: torch.Tensor  # [A] gate values, differentiable w.r.t. the router
    token_offsets: torch.Tensor  # [T + 1] int64
    num_experts: int


@dataclass
class RoutingStats:
    """Detached per-layer statistics of one forward pass, for logging."""

    tokens_per_expert: torch.Tensor  # [E] kept assignments per expert (the expert-load histogram)
    dropped: torch.Tensor  # assignments dropped by the capacity limit
    unrouted_tokens: torch.Tensor  # tokens left with no expert at all (zero output)
    z_loss: torch.Tensor  # mean(logsumexp(logits)^2) without its coefficient
    # Switch loss without its coefficient (1.0 when balanced); None for expert choice, balanced by design
    load_balancing_loss: Optional[torch.Tensor] = None


def expert_capacity(num_tokens: int, topk: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(T * k * capacity_factor / E)``."""
    return math.ceil(num_tokens * topk * capacity_factor / num_experts)


def switch_load_balancing_loss(
    probs: torch.Tensor,
    tokens_per_expert: torch.Tensor,
    num_tokens: int | torch.Tensor,
    topk: int,
) -> torch.Tensor:
    """Switch loss without coefficient: ``E * sum_i f_i * P_i``.

    ``f_i = tokens_per_expert[i] / (T * k)``, the share of routed slots that go to expert i, and
    ``P_i = sum_t probs[t, i] / T``. ``probs`` may be the local share of a larger batch whose counts and
    token total are given (Megatron's convention with sequence parallelism): the per-rank losses then
    sum to the loss of the whole batch.
    """
    num_experts = probs.shape[-1]
    f = tokens_per_expert.to(probs.dtype) / (num_tokens * topk)
    p = probs.sum(dim=0) / num_tokens
    return num_experts * torch.sum(f * p)


def router_z_loss(logits: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE z-loss without coefficient: mean over (valid) tokens of ``logsumexp(logits)^2``."""
    z = torch.logsumexp(logits, dim=-1).square()
    if valid is None:
        return z.mean()
    return (z * valid).sum() / valid.sum().clamp_min(1)


def _offsets_from_counts(counts: torch.Tensor) -> torch.Tensor:
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.long, device=counts.device)
    torch.cumsum(counts, dim=0, out=offsets[1:])
    return offsets


class _Router(torch.nn.Module):
    """Shared parts: the gate weight, fp32 logits, the NaN check and loss attachment."""

    def __init__(self, config, token_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.config = config
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        # Ranks holding other tokens of the same micro-batch (tensor/sequence parallel peers).
        self.token_group = token_group
        self.layer_number: Optional[int] = None
        device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else "cuda"
        self.weight = torch.nn.Parameter(
            torch.empty(self.num_experts, config.hidden_size, dtype=config.params_dtype, device=device)
        )
        if config.perform_initialization:
            config.init_method(self.weight)
        # Sequence-parallel peers see different tokens: Megatron all-reduces such grads over TP.
        self.weight.sequence_parallel = config.sequence_parallel

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def _token_group_size(self) -> int:
        return 1 if self.token_group is None else dist.get_world_size(self.token_group)

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_r^T`` in fp32 (fp64 for fp64 inputs or ``--moe-router-dtype fp64``), autocast or not."""
        wide = x.dtype == torch.float64 or self.config.moe_router_dtype == "fp64"
        dtype = torch.float64 if wide else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            logits = x.to(dtype) @ self.weight.to(dtype).t()
        if not bool(torch.isfinite(logits).all()):
            bad = int((~torch.isfinite(logits)).any(dim=-1).sum())
            raise RouterLogitsError(
                f"router logits of MoE layer {self.layer_number} hold NaN/Inf for {bad} of "
                f"{logits.shape[0]} tokens: the model diverged before this layer (lower --lr, check the "
                f"loss scale, or keep --moe-router-dtype fp32)"
            )
        return logits

    def _attaching(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def _num_layers(self) -> int:
        return self.config.num_layers + (self.config.mtp_num_layers or 0)

    def _attach(self, tensor, loss, coeff: float, name: str, num_tokens, share_of_sum: bool) -> torch.Tensor:
        """Attach ``coeff * loss`` to ``tensor``'s backward and record it for Megatron's aux-loss log, which
        sums the record over the token group: a loss that is this rank's share of a sum goes in as it is, a
        local mean as its share of the group's mean."""
        if coeff == 0 or not self._attaching():
            return tensor
        tracked = loss.detach() if share_of_sum else loss.detach() / self._token_group_size()
        save_to_aux_losses_tracker(name, tracked, self.layer_number, self._num_layers(), reduce_group=self.token_group)
        scaled = coeff * loss
        if self.config.calculate_per_token_loss:
            scaled = scaled * num_tokens
        return MoEAuxLossAutoScaler.apply(tensor, scaled)

    def _z_loss(self, logits: torch.Tensor, valid: Optional[torch.Tensor]):
        """Unscaled z-loss, and logits carrying its gradient when training with a z-loss coefficient."""
        z = router_z_loss(logits, valid)
        coeff = (self.config.moe_z_loss_coeff or 0.0) / self._token_group_size()
        num_tokens = logits.shape[0] if valid is None else valid.sum()
        return z, self._attach(logits, z, coeff, "z_loss", num_tokens, share_of_sum=False)


class TokenChoiceRouter(_Router):
    """Each token takes its top-k experts.

    ``s = softmax(x W_r^T)`` in fp32; the top-k entries are kept and renormalised to sum to one when
    k > 1 (k = 1 keeps the raw probability, so the router still gets a gradient). With
    ``--moe-expert-capacity-factor`` each expert keeps at most ``ceil(T*k*cf/E)`` assignments, chosen by
    ``--moe-token-drop-policy`` (highest gate first, or first in token order).
    """

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None):
        num_tokens, k, num_experts = x.shape[0], self.topk, self.num_experts
        logits = self.gate_logits(x)
        z_value, logits = self._z_loss(logits, valid)
        probs = torch.softmax(logits, dim=-1)
        top_probs, top_experts = probs.topk(k, dim=-1)
        top_experts, order = top_experts.sort(dim=-1)
        gate = top_probs.gather(-1, order)
        if k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        if self.config.moe_router_topk_scaling_factor:
            gate = gate * self.config.moe_router_topk_scaling_factor

        gate, balance = self._load_balancing(gate, probs, top_experts, valid)

        flat_experts = top_experts.reshape(-1)
        flat_gate = gate.reshape(-1)
        capacity_factor = self.config.moe_expert_capacity_factor
        if capacity_factor is None:
            kept_per_token = torch.full((num_tokens,), k, dtype=torch.long, device=x.device)
            expert_index, weight = flat_experts, flat_gate
        else:
            capacity = expert_capacity(num_tokens, k, num_experts, capacity_factor)
            keep = self._capacity_mask(flat_experts, flat_gate.detach(), capacity)
            kept_per_token = keep.view(num_tokens, k).sum(dim=-1)
            expert_index, weight = flat_experts[keep], flat_gate[keep]

        tokens_per_expert = torch.bincount(expert_index, minlength=num_experts)
        stats = RoutingStats(
            tokens_per_expert=tokens_per_expert.detach(),
            dropped=num_tokens * k - kept_per_token.sum(),
            unrouted_tokens=(kept_per_token == 0).sum(),
            load_balancing_loss=balance,
            z_loss=z_value.detach(),
        )
        routing = Routing(expert_index, weight, _offsets_from_counts(kept_per_token), num_experts)
        return routing, stats

    def _load_balancing(self, gate, probs, top_experts, valid):
        """The unscaled Switch loss over the whole (sequence-parallel) batch; gate carries its gradient."""
        if valid is None:
            counts = torch.bincount(top_experts.reshape(-1), minlength=self.num_experts)
            num_tokens = torch.tensor(float(probs.shape[0]), dtype=probs.dtype, device=probs.device)
        else:
            counts = torch.bincount(top_experts[valid].reshape(-1), minlength=self.num_experts)
            probs = probs * valid.unsqueeze(-1)
            num_tokens = valid.sum().to(probs.dtype)
        local_tokens = num_tokens
        if self._token_group_size() > 1:
            counts_and_tokens = torch.cat([counts.to(probs.dtype), num_tokens.view(1)])
            dist.all_reduce(counts_and_tokens, group=self.token_group)
            counts, num_tokens = counts_and_tokens[:-1], counts_and_tokens[-1]
        # clamped: a micro-batch of padding only has no valid token, and a zero loss rather than 0 / 0
        balance = switch_load_balancing_loss(probs, counts, num_tokens.clamp_min(1), self.topk)
        if self.config.moe_router_load_balancing_type == "none":
            return gate, balance.detach()
        gate = self._attach(
            gate, balance, self.config.moe_aux_loss_coeff, "load_balancing_loss", local_tokens, share_of_sum=True
        )
        return gate, balance.detach()

    def _capacity_mask(self, experts: torch.Tensor, gate: torch.Tensor, capacity: int) -> torch.Tensor:
        """Keep, per expert, the ``capacity`` assignments first in drop-policy order."""
        n = experts.numel()
        if self.config.moe_token_drop_policy == "probs":
            priority = torch.argsort(gate, descending=True, stable=True)
        else:
            priority = torch.arange(n, device=experts.device)
        by_expert = priority[torch.argsort(experts[priority], stable=True)]
        counts = torch.bincount(experts, minlength=self.num_experts)
        first_slot = torch.cumsum(counts, dim=0) - counts
        rank_in_expert = torch.arange(n, device=experts.device) - first_slot[experts[by_expert]]
        keep = torch.empty(n, dtype=torch.bool, device=experts.device)
        keep[by_expert] = rank_in_expert < capacity
        return keep


class ExpertChoiceRouter(_Router):
    """Each expert takes the C tokens with the highest router probability for it (Zhou et al. 2022).

    ``s = softmax(x W_r^T)`` over experts; ``C = ceil(T * k * cf / E)`` with ``cf`` the capacity factor
    (1.0 when unset), so the layer does the work of top-k routing. A token may be taken by any number of
    experts, including none. The gate is the raw probability. Loads are balanced by construction, so no
    load-balancing loss is attached; the z-loss is. The choice looks at the whole batch: tokens influence
    each other's routing, as in the paper's expert-choice models.
    """

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None):
        num_tokens, num_experts = x.shape[0], self.num_experts
        logits = self.gate_logits(x)
        z_value, logits = self._z_loss(logits, valid)
        probs = torch.softmax(logits, dim=-1)
        capacity_factor = self.config.moe_expert_capacity_factor or 1.0
        capacity = min(num_tokens, expert_capacity(num_tokens, self.topk, num_experts, capacity_factor))
        chosen_probs, chosen_tokens = probs.t().topk(capacity, dim=-1)  # [E, C]
        experts = torch.arange(num_experts, device=x.device).repeat_interleave(capacity)
        tokens = chosen_tokens.reshape(-1)
        order = torch.argsort(tokens * num_experts + experts)
        per_token = torch.bincount(tokens, minlength=num_tokens)
        tokens_per_expert = torch.full((num_experts,), capacity, dtype=torch.long, device=x.device)
        stats = RoutingStats(
            tokens_per_expert=tokens_per_expert,
            dropped=torch.zeros((), dtype=torch.long, device=x.device),
            unrouted_tokens=(per_token == 0).sum(),
            z_loss=z_value.detach(),
        )
        routing = Routing(
            experts[order], chosen_probs.reshape(-1)[order], _offsets_from_counts(per_token), num_experts
        )
        return routing, stats


def build_router(router_type: str, config, token_group: Optional[dist.ProcessGroup] = None) -> _Router:
    """The router named by ``--moe-router-type``."""
    routers = {"token_choice": TokenChoiceRouter, "expert_choice": ExpertChoiceRouter}
    if router_type not in routers:
        raise GranularMoEConfigError(
            f"--moe-router-type {router_type!r} is not valid; valid values: {', '.join(routers)}"
        )
    return routers[router_type](config, token_group)
