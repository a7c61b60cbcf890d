"""Routers: token choice (each token takes its top-k experts) and expert choice (each expert takes its
top-C tokens), with the load-balancing losses, the z-loss and aux-loss-free expert bias.

Both return a :class:`Routing`: the kept (token, expert, gate) assignments in token-major order, the layout
every dispatcher and kernel of this package consumes. Expert selection follows megatron-core 0.19
(:mod:`granular_moe.scores`: softmax, sigmoid or sqrt-softplus scores, pre-softmax, group-limited top-k,
scaling factor, expert bias), and so do the losses (:mod:`granular_moe.balance`). Losses reach the backward
pass the way Megatron's router does it: attached with ``MoEAuxLossAutoScaler`` to a tensor on the output path,
scaled by the schedule's loss scale, and recorded in Megatron's aux-loss tracker under its names
(``load_balancing_loss``, ``seq_load_balancing_loss``, ``global_load_balancing_loss``, ``z_loss``).

Aux-loss-free balancing (``--moe-router-enable-expert-bias``) keeps megatron-core's buffers
``expert_bias [E]`` (fp32, saved with the model) and ``local_tokens_per_expert [E]``: the loads of the step's
micro-batches accumulate in the latter, and megatron-core's ``finalize_model_grads`` (the main job's and
Megatron-LM's) updates the bias once per optimizer step from the loads summed over the tensor- and
data-parallel ranks (``bias += rate * sign(mean load - load)``), identically on every rank, then clears them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from granular_moe import balance
from granular_moe.config import GranularMoEConfigError, balance_coefficients
from granular_moe.scores import Selection, aux_loss_scores, select_experts


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
    """Per-layer statistics of one forward pass, for logging: detached, except the losses of a router whose
    ``attach_losses`` is False (differentiable, for the caller to add to its loss)."""

    tokens_per_expert: torch.Tensor  # [E] kept assignments per expert (the expert-load histogram)
    dropped: torch.Tensor  # assignments dropped by the capacity limit
    unrouted_tokens: torch.Tensor  # tokens left with no expert at all (zero output)
    z_loss: torch.Tensor  # mean(logsumexp(logits)^2) without its coefficient
    # The configured balance losses without their coefficients, by type (1.0 when balanced); empty for expert
    # choice, balanced by design
    balance_losses: Optional[dict] = None

    @property
    def load_balancing_loss(self) -> Optional[torch.Tensor]:
        """The first configured balance loss (the micro-batch Switch loss when it is configured)."""
        if not self.balance_losses:
            return None
        return self.balance_losses.get("aux_loss", next(iter(self.balance_losses.values())))


def expert_capacity(num_tokens: int, topk: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert: ``ceil(T * k * capacity_factor / E)``."""
    return math.ceil(num_tokens * topk * capacity_factor / num_experts)


def switch_load_balancing_loss(probs: torch.Tensor, tokens_per_expert: torch.Tensor, num_tokens, topk: int):
    """Switch loss without coefficient: ``E * sum_i f_i * P_i`` (``f_i = tokens_per_expert[i] / (T k)``,
    ``P_i = sum_t probs[t, i] / T``); ``probs`` may be a rank's share of a batch whose counts and token total
    are given, and the per-rank losses then sum to the batch's."""
    return balance.switch_loss(probs, tokens_per_expert.to(probs.dtype), num_tokens, topk, probs.shape[-1])


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


class WideLinear(torch.autograd.Function):
    """``x @ weight^T`` computed in ``dtype`` (the router's fp32 or fp64), keeping for the backward ``x`` and
    ``weight`` as they are (bf16 in mixed precision: the tensors a step holds anyway) rather than their wide copies,
    which autograd would keep; the backward widens them again. Gradients equal autograd's through the casts."""

    @staticmethod
    def forward(ctx, x, weight, dtype):
        ctx.save_for_backward(x, weight)
        ctx.dtype = dtype
        return x.to(dtype) @ weight.to(dtype).t()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.to(ctx.dtype)
        grad_x = (grad @ weight.to(ctx.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad.t() @ x.to(ctx.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None


def _replaying() -> bool:
    """In the backward's second run of a checkpointed forward (megatron-core's activation recompute): the
    tokens were counted in the first run."""
    from megatron.core.tensor_parallel.random import is_checkpointing

    return is_checkpointing() and torch.is_grad_enabled()


class _Router(torch.nn.Module):
    """Shared parts: the gate weight, fp32 logits, the count of non-finite logits and loss attachment."""

    def __init__(self, config, token_group: Optional[dist.ProcessGroup] = None):
        super().__init__()
        self.config = config
        self.num_experts = config.num_moe_experts
        self.topk = config.moe_router_topk
        # Ranks holding other tokens of the same micro-batch (tensor/sequence parallel peers).
        self.token_group = token_group
        self.layer_number: Optional[int] = None
        self.device = "cpu" if config.use_cpu_initialization or not torch.cuda.is_available() else "cuda"
        self.weight = torch.nn.Parameter(
            torch.empty(self.num_experts, config.hidden_size, dtype=config.params_dtype, device=self.device)
        )
        if config.perform_initialization:
            config.init_method(self.weight)
        # Sequence-parallel peers see different tokens: Megatron all-reduces such grads over TP.
        self.weight.sequence_parallel = config.sequence_parallel
        # Tokens with NaN/Inf logits since the last check (a device tensor: read once per step), tokens seen.
        self.nonfinite_tokens: Optional[torch.Tensor] = None
        self.checked_tokens = 0
        # False: the balance losses and the z-loss are neither attached to the backward nor recorded in
        # megatron-core's tracker; the stats carry them differentiable and without coefficients, for a caller
        # that adds them to its loss itself (as DeepSpeed's MoE returns its l_aux).
        self.attach_losses = True
        # DeepSpeed's MoE capacity rules, for callers that follow them (megatron-core has neither): a capacity
        # factor for eval mode (None: --moe-expert-capacity-factor's) and a floor under every expert's capacity.
        self.eval_capacity_factor: Optional[float] = None
        self.min_capacity = 0

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def _token_group_size(self) -> int:
        return 1 if self.token_group is None else dist.get_world_size(self.token_group)

    def gate_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_r^T`` in fp32 (fp64 for fp64 inputs or ``--moe-router-dtype fp64``), autocast or not. Tokens
        whose logits hold NaN/Inf are counted on the device, for :func:`check_router_logits`."""
        wide = x.dtype == torch.float64 or self.config.moe_router_dtype == "fp64"
        dtype = torch.float64 if wide else torch.float32
        with torch.autocast(x.device.type, enabled=False):
            logits = WideLinear.apply(x, self.weight, dtype)
        if not _replaying():
            with torch.no_grad():
                bad = (~torch.isfinite(logits)).any(dim=-1).sum()
                self.nonfinite_tokens = bad if self.nonfinite_tokens is None else self.nonfinite_tokens + bad
                self.checked_tokens += logits.shape[0]
        return logits

    def _attaching(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def capacity(self, num_tokens: int, topk: int, default_factor: Optional[float] = None) -> Optional[int]:
        """Slots per expert for ``num_tokens`` tokens: ``max(ceil(T k cf / E), min_capacity)`` with ``cf``
        ``--moe-expert-capacity-factor`` (``eval_capacity_factor`` in eval mode when set, ``default_factor`` when
        unset); None: dropless."""
        factor = self.config.moe_expert_capacity_factor
        if factor is not None and not self.training and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        factor = factor if factor is not None else default_factor
        if factor is None:
            return None
        return max(expert_capacity(num_tokens, topk, self.num_experts, factor), self.min_capacity)

    def _reported(self, loss: torch.Tensor) -> torch.Tensor:
        """A loss as the stats carry it: detached, or differentiable for a caller that adds it itself."""
        return loss if not self.attach_losses else loss.detach()

    def _num_layers(self) -> int:
        return self.config.num_layers + (self.config.mtp_num_layers or 0)

    def _attach(self, tensor, loss, coeff: float, name: str, num_tokens, share_of_sum: bool,
                record_group=None, needs_dp_avg: bool = True) -> torch.Tensor:
        """Attach ``coeff * loss`` to ``tensor``'s backward and record it for Megatron's aux-loss log, which
        sums the record over ``record_group`` (the token group by default): a loss that is this rank's share
        of a sum goes in as it is, a local mean as its share of the group's mean."""
        if coeff == 0 or not self._attaching() or not self.attach_losses:
            return tensor
        tracked = loss.detach() if share_of_sum else loss.detach() / self._token_group_size()
        get_moe_metrics_tracker().record(
            name, tracked, self.layer_number, self._num_layers(),
            reduce_group=record_group if record_group is not None else self.token_group, needs_dp_avg=needs_dp_avg,
        )
        scaled = coeff * loss
        if self.config.calculate_per_token_loss:
            scaled = scaled * num_tokens
        return MoEAuxLossAutoScaler.apply(tensor, scaled)

    def _z_loss(self, logits: torch.Tensor, valid: Optional[torch.Tensor]):
        """Unscaled z-loss, and logits carrying its gradient when training with a z-loss coefficient (without
        one the z-loss is a statistic: computed without autograd, nothing kept for the backward)."""
        coeff = (self.config.moe_z_loss_coeff or 0.0) / self._token_group_size()
        with torch.set_grad_enabled(torch.is_grad_enabled() and (coeff != 0 or not self.attach_losses)):
            z = router_z_loss(logits, valid)
        num_tokens = logits.shape[0] if valid is None else valid.sum()
        return z, self._attach(logits, z, coeff, "z_loss", num_tokens, share_of_sum=False)


class TokenChoiceRouter(_Router):
    """Each token takes its top-k experts, chosen and weighted as megatron-core's ``TopKRouter`` does
    (:mod:`granular_moe.scores`). With ``--moe-expert-capacity-factor`` each expert keeps at most
    ``ceil(T*k*cf/E)`` assignments, chosen by ``--moe-token-drop-policy`` (highest gate first, or first in
    token order). Load-balancing losses: :mod:`granular_moe.balance`."""

    def __init__(self, config, token_group: Optional[dist.ProcessGroup] = None):
        super().__init__(config, token_group)
        self.selection = Selection.from_config(config)
        self.balance_coefficients = balance_coefficients(config)
        self.enable_expert_bias = bool(config.moe_router_enable_expert_bias)
        if self.enable_expert_bias:
            zeros = torch.zeros(self.num_experts, dtype=torch.float32, device=self.device)
            self.register_buffer("expert_bias", zeros.clone())
            self.register_buffer("local_tokens_per_expert", zeros.clone(), persistent=False)
        else:
            self.expert_bias = self.local_tokens_per_expert = None
        if "global_aux_loss" in self.balance_coefficients:
            loads = torch.zeros(self.num_experts, dtype=torch.float64, device=self.device)
            self.register_buffer("global_tokens_per_expert", loads, persistent=False)
            self.register_buffer("ga_steps", torch.zeros((), dtype=torch.float64, device=self.device), persistent=False)
        else:
            self.global_tokens_per_expert = self.ga_steps = None

    def reset_global_aux_loss_tracker(self) -> None:
        """Called by megatron-core's ``finalize_model_grads`` after each step: a new global batch begins."""
        if self.global_tokens_per_expert is not None:
            self.global_tokens_per_expert.zero_()
            self.ga_steps.zero_()

    def _float32_bias(self) -> None:
        """megatron-core's ``_maintain_float32_expert_bias``: ``Float16Module`` casts buffers to bf16; the
        bias and its loads stay fp32, so that routing and its updates are exact."""
        for name in ("expert_bias", "local_tokens_per_expert"):
            buffer = getattr(self, name)
            if buffer is not None and buffer.dtype != torch.float32:
                buffer.data = buffer.data.float()

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None, sequence_shape: Optional[tuple] = None):
        num_tokens, k, num_experts = x.shape[0], self.topk, self.num_experts
        if self.enable_expert_bias:
            self._float32_bias()
        logits = self.gate_logits(x)
        z_value, logits = self._z_loss(logits, valid)
        gate, top_experts = select_experts(logits, self.selection, self.expert_bias)  # experts ascending per token
        gate, losses = self._balance(gate, logits, valid, sequence_shape or (num_tokens, 1))

        flat_experts = top_experts.reshape(-1)
        flat_gate = gate.reshape(-1)
        capacity = self.capacity(num_tokens, k)
        keep = None
        if capacity is None:
            kept_per_token = torch.full((num_tokens,), k, dtype=torch.long, device=x.device)
            expert_index, weight = flat_experts, flat_gate
        else:
            keep = self._capacity_mask(flat_experts, flat_gate.detach(), capacity)
            kept_per_token = keep.view(num_tokens, k).sum(dim=-1)
            expert_index, weight = flat_experts[keep], flat_gate[keep]

        tokens_per_expert = balance.bin_counts(expert_index, num_experts)
        if self.enable_expert_bias and self._attaching():
            self._count_loads(flat_experts, keep, valid)
        stats = RoutingStats(
            tokens_per_expert=tokens_per_expert.detach(),
            dropped=num_tokens * k - kept_per_token.sum(),
            unrouted_tokens=(kept_per_token == 0).sum(),
            balance_losses=losses,
            z_loss=self._reported(z_value),
        )
        routing = Routing(expert_index, weight, _offsets_from_counts(kept_per_token), num_experts)
        return routing, stats

    @torch.no_grad()
    def _count_loads(self, flat_experts, keep, valid) -> None:
        """Add this micro-batch's kept assignments of (valid) tokens to the loads the bias update reads."""
        counted = torch.ones_like(flat_experts, dtype=torch.bool) if keep is None else keep
        if valid is not None:
            counted = counted & valid.repeat_interleave(self.topk)
        loads = balance.bin_counts(flat_experts, self.num_experts, counted)
        self.local_tokens_per_expert += loads.to(self.local_tokens_per_expert.dtype)

    def _balance(self, gate, logits, valid, sequence_shape):
        """The configured load-balancing losses (unscaled, detached, by type; the micro-batch Switch loss is
        reported even when not configured, for the logs); ``gate`` carries their gradient when training."""
        losses = {}
        scores, chosen = aux_loss_scores(logits, self.topk, self.selection.score_function)
        kinds = {
            "aux_loss": lambda: balance.batch_loss(scores, chosen, valid, self.topk, self.token_group),
            "seq_aux_loss": lambda: balance.sequence_loss(scores, chosen, valid, self.topk, self.token_group,
                                                          sequence_shape),
            "global_aux_loss": lambda: balance.global_loss(scores, chosen, valid, self.topk, self._global_group(),
                                                           self.global_tokens_per_expert, self.ga_steps),
        }
        local_tokens = logits.shape[0] if valid is None else valid.sum()
        for kind, coefficient in self.balance_coefficients.items():
            if kind == "global_aux_loss" and not self._attaching():
                continue  # the global batch's loads are a training quantity
            loss = kinds[kind]()
            global_kind = kind == "global_aux_loss"
            gate = self._attach(gate, loss, coefficient, balance.TRACKER_NAMES[kind], local_tokens, share_of_sum=True,
                                record_group=self._global_group() if global_kind else None,
                                needs_dp_avg=not global_kind)
            losses[kind] = self._reported(loss)
        if "aux_loss" not in losses:
            losses["aux_loss"] = self._reported(kinds["aux_loss"]())
        return gate, losses

    def _global_group(self):
        """The ranks holding tokens of the global batch: the data-parallel group, and the tensor-parallel group
        too under sequence parallelism (without it tensor-parallel ranks route the same tokens)."""
        from megatron.core import parallel_state

        if not parallel_state.model_parallel_is_initialized():
            return None
        if self.token_group is not None:
            return parallel_state.get_tensor_and_data_parallel_group()
        return parallel_state.get_data_parallel_group()

    def _capacity_mask(self, experts: torch.Tensor, gate: torch.Tensor, capacity: int) -> torch.Tensor:
        """Keep, per expert, the ``capacity`` assignments first in drop-policy order."""
        n = experts.numel()
        if self.config.moe_token_drop_policy == "probs":
            priority = torch.argsort(gate, descending=True, stable=True)
        else:
            priority = torch.arange(n, device=experts.device)
        by_expert = priority[torch.argsort(experts[priority], stable=True)]
        counts = balance.bin_counts(experts, self.num_experts)
        first_slot = torch.cumsum(counts, dim=0) - counts
        rank_in_expert = torch.arange(n, device=experts.device) - first_slot[experts[by_expert]]
        keep = torch.empty(n, dtype=torch.bool, device=experts.device)
        keep[by_expert] = rank_in_expert < capacity
        return keep


class ExpertChoiceRouter(_Router):
    """Each expert takes the C tokens with the highest router probability for it (Zhou et al. 2022).

    ``s = softmax(x W_r^T)`` over experts; ``C = ceil(T * k * cf / E)`` with ``cf`` the capacity factor
    (1.0 when unset), so the layer does the work of top-k routing. A token may be taken by any number of
    experts, including none. The gate is the probability (times ``--moe-router-topk-scaling-factor`` when
    set). Loads are balanced by construction: no load-balancing loss, expert bias, other score function or group
    limit applies (each is refused by name); the z-loss does. The choice looks at the whole batch: tokens
    influence each other's routing, as in the paper's expert-choice models.
    """

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None, sequence_shape: Optional[tuple] = None):
        num_tokens, num_experts = x.shape[0], self.num_experts
        logits = self.gate_logits(x)
        z_value, logits = self._z_loss(logits, valid)
        probs = torch.softmax(logits, dim=-1)
        capacity = min(num_tokens, self.capacity(num_tokens, self.topk, default_factor=1.0))
        chosen_probs, chosen_tokens = probs.t().topk(capacity, dim=-1)  # [E, C]
        if self.config.moe_router_topk_scaling_factor:
            chosen_probs = chosen_probs * self.config.moe_router_topk_scaling_factor
        experts = torch.arange(num_experts, device=x.device).repeat_interleave(capacity)
        tokens = chosen_tokens.reshape(-1)
        order = torch.argsort(tokens * num_experts + experts)
        per_token = balance.bin_counts(tokens, num_tokens)
        tokens_per_expert = torch.full((num_experts,), capacity, dtype=torch.long, device=x.device)
        stats = RoutingStats(
            tokens_per_expert=tokens_per_expert,
            dropped=torch.zeros((), dtype=torch.long, device=x.device),
            unrouted_tokens=(per_token == 0).sum(),
            z_loss=self._reported(z_value),
            balance_losses={},
        )
        routing = Routing(
            experts[order], chosen_probs.reshape(-1)[order], _offsets_from_counts(per_token), num_experts
        )
        return routing, stats


def check_router_logits(modules: list, num_layers: int, device, group: Optional[dist.ProcessGroup] = None) -> None:
    """The per-step NaN/Inf check of the routers in ``modules`` (as Megatron-LM's
    ``--check-for-nan-in-loss-and-grad`` checks the loss): raise :class:`RouterLogitsError` naming the first
    MoE layer (of ``num_layers``, the model's) whose router saw non-finite logits since the last check, on every
    rank of ``group`` (the world by default; each rank holds its pipeline stage's layers). One all-reduce and
    one read to the host; the counts start again from zero.
    """
    routers = [m for module in modules for m in module.modules() if isinstance(m, _Router)]
    counts = torch.zeros(2, num_layers + 1, dtype=torch.float64, device=device)  # [bad, seen] by layer number
    for router in routers:
        if router.nonfinite_tokens is not None:
            counts[0, router.layer_number or 0] += router.nonfinite_tokens.to(device)
            counts[1, router.layer_number or 0] += router.checked_tokens
        router.nonfinite_tokens, router.checked_tokens = None, 0
    if dist.is_initialized():
        dist.all_reduce(counts, group=group)
    bad, seen = counts.tolist()
    for layer, (tokens, of) in enumerate(zip(bad, seen)):
        if tokens:
            raise RouterLogitsError(
                f"router logits of MoE layer {layer} held NaN/Inf for {int(tokens)} of the {int(of)} tokens it routed "
                f"this step (summed over the ranks routing them): "
                f"the model diverged before this layer (lower --lr, check the loss scale, or keep "
                f"--moe-router-dtype fp32)"
            )


def build_router(router_type: str, config, token_group: Optional[dist.ProcessGroup] = None) -> _Router:
    """The router named by ``--moe-router-type``."""
    routers = {"token_choice": TokenChoiceRouter, "expert_choice": ExpertChoiceRouter}
    if router_type not in routers:
        raise GranularMoEConfigError(
            f"--moe-router-type {router_type!r} is not valid; valid values: {', '.join(routers)}"
        )
    return routers[router_type](config, token_group)
