"""Load-balancing losses of the token-choice router, with megatron-core 0.19's numerics and names.

``--moe-router-load-balancing-type`` takes one type or a list, each with its coefficient from
``--moe-aux-loss-coeff`` (a list of the same length when the type is a list; checked, and paired, by
:func:`granular_moe.config.balance_coefficients`):

- ``aux_loss`` (Switch, per micro-batch): ``E * sum_i f_i * P_i`` with ``f_i`` the share of the micro-batch's
  ``T*k`` routed slots that go to expert ``i`` and ``P_i`` its mean score over the ``T`` tokens; recorded as
  ``load_balancing_loss``;
- ``seq_aux_loss`` (DeepSeek-V2/V3): the same per sequence, averaged over the micro-batch's sequences;
  recorded as ``seq_load_balancing_loss``;
- ``global_aux_loss`` (Qwen3): ``f_i`` from the loads over the global batch (summed over the data-parallel
  ranks, averaged over the micro-batches so far of the step), ``P_i`` over this rank's tokens; recorded as
  ``global_load_balancing_loss``;
- ``none``: no loss.

As in megatron-core, ``f_i`` counts the experts each token would take by the scores alone (its plain top-k:
no expert bias, no group limit, before capacity drops) and ``P_i`` uses the scores over all experts (softmax,
or the sigmoid / sqrt-softplus scores normalised per token). Loads are summed over the ranks holding other
tokens of the same batch (the tensor-parallel group under sequence parallelism, and the data-parallel group
for the global loss), so the per-rank losses sum to the batch's. Padding tokens count for neither.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

TRACKER_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss",
                 "global_aux_loss": "global_load_balancing_loss"}


def switch_loss(scores: torch.Tensor, loads: torch.Tensor, num_tokens, topk: int, num_experts: int) -> torch.Tensor:
    """megatron-core's ``switch_load_balancing_loss_func`` without its coefficient: ``scores [T_local, E']``
    summed over this rank's tokens, ``loads [E']`` the routed slots per column over all ``num_tokens`` tokens
    of the batch: ``E * sum(P * f)`` with ``f = loads / (T k)``, ``P = sum scores / T``."""
    return torch.sum(scores.sum(dim=0) * loads) * num_experts / (topk * num_tokens * num_tokens)


def _summed(tensor: torch.Tensor, group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        tensor = tensor.clone()
        dist.all_reduce(tensor, group=group)
    return tensor


def bin_counts(index: torch.Tensor, bins: int, counted: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.bincount(index[counted], minlength=bins)`` for indices below ``bins`` (int64), with a size fixed by
    ``bins`` (bincount's depends on the largest index, which breaks a torch.compile graph) and ``counted``, a mask
    of ``index``'s shape, applied by weight rather than by selection (no data-dependent shape either)."""
    index = index.reshape(-1)
    ones = torch.ones_like(index) if counted is None else counted.reshape(-1).to(index.dtype)
    return torch.zeros(bins, dtype=index.dtype, device=index.device).index_add_(0, index, ones)


def _loads(chosen: torch.Tensor, columns: int, valid: Optional[torch.Tensor], offset: Optional[torch.Tensor] = None):
    """Routed slots per column of ``chosen [T, k]`` (shifted by ``offset [T]``, e.g. a token's sequence), valid
    tokens only."""
    if offset is not None:
        chosen = chosen + offset.unsqueeze(-1)
    counted = None if valid is None else valid.unsqueeze(-1).expand_as(chosen)
    return bin_counts(chosen, columns, counted).to(torch.float64)


def batch_loss(scores, chosen, valid, topk: int, group) -> torch.Tensor:
    """``aux_loss``: the Switch loss of the micro-batch (its tokens on every rank of ``group``)."""
    num_experts = scores.shape[-1]
    loads = _summed(_loads(chosen, num_experts, valid).to(scores.dtype), group)
    if valid is not None:
        scores = scores * valid.unsqueeze(-1)
    tokens = (loads.sum() / topk).clamp_min(1)  # a micro-batch of padding only: 0 rather than 0 / 0
    return switch_loss(scores, loads, tokens, topk, num_experts)


def sequence_loss(scores, chosen, valid, topk: int, group, sequence_shape: tuple) -> torch.Tensor:
    """``seq_aux_loss``: the Switch loss of each sequence, averaged over the micro-batch's ``b`` sequences
    (tokens ordered ``[s, b]``, position-major, as megatron-core flattens them)."""
    seq, batch = sequence_shape
    num_experts = scores.shape[-1]
    sequence = torch.arange(scores.shape[0], device=scores.device) % batch
    loads = _summed(_loads(chosen, batch * num_experts, valid, sequence * num_experts).to(scores.dtype), group)
    if valid is not None:
        scores = scores * valid.unsqueeze(-1)
    tokens = (loads.sum() / (topk * batch)).clamp_min(1)
    return switch_loss(scores.reshape(seq, batch * num_experts), loads, tokens, topk, num_experts) / batch


def global_loss(scores, chosen, valid, topk: int, group, accumulated: torch.Tensor, steps: torch.Tensor):
    """``global_aux_loss``: the Switch loss with the loads of the global batch so far this step (summed over
    ``group``, every rank holding tokens of it; ``accumulated``/``steps`` carry them between micro-batches)."""
    num_experts = scores.shape[-1]
    loads = _summed(_loads(chosen, num_experts, valid).to(accumulated.dtype), group)
    with torch.no_grad():
        accumulated += loads
        steps += 1
    if valid is not None:
        scores = scores * valid.unsqueeze(-1)
    tokens = (loads.sum() / topk).clamp_min(1)
    return switch_loss(scores, (accumulated / steps).to(scores.dtype), tokens, topk, num_experts)
