"""Expert scores and top-k expert selection, with megatron-core 0.19's numerics
(``moe_utils.topk_routing_with_score_function`` and ``group_limited_topk``), in the dense ``[tokens, k]`` form
the granular router turns into its per-token assignment lists.

- ``softmax`` (default): without ``--moe-router-pre-softmax``, the top-k logits are chosen and softmaxed among
  themselves (the gates of a token sum to 1); with it, the softmax over all experts comes first and the top-k
  probabilities are the gates as they are.
- ``sigmoid`` / ``sqrtsoftplus``: scores ``sigmoid(logits)`` / ``sqrt(softplus(logits))``; the top-k are chosen
  on ``score + expert_bias`` when an expert bias is given (aux-loss-free balancing), and the gates are the
  chosen scores (without the bias), divided by their sum when k > 1.
- group-limited (``--moe-router-num-groups``, ``--moe-router-group-topk``): the experts are cut into
  equal consecutive groups; each token first takes the ``group_topk`` groups whose top ``k / group_topk``
  selection scores sum highest, then its top-k experts among them. With groups aligned to expert-parallel
  ranks or nodes, each token visits at most ``group_topk`` of them.
- the gates are multiplied by ``--moe-router-topk-scaling-factor`` when it is set.

Every computation is in the logits' dtype (fp32, or fp64 with ``--moe-router-dtype fp64``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

SCORE_FUNCTIONS = ("softmax", "sigmoid", "sqrtsoftplus")


@dataclass(frozen=True)
class Selection:
    """How a router picks and weighs experts (the ``TransformerConfig`` fields of the same meaning)."""

    topk: int
    score_function: str = "softmax"
    pre_softmax: bool = False
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None
    scaling_factor: Optional[float] = None

    @classmethod
    def from_config(cls, config) -> "Selection":
        return cls(
            topk=config.moe_router_topk,
            score_function=config.moe_router_score_function,
            pre_softmax=config.moe_router_pre_softmax,
            num_groups=config.moe_router_num_groups if config.moe_router_group_topk else None,
            group_topk=config.moe_router_group_topk or None,
            scaling_factor=config.moe_router_topk_scaling_factor or None,
        )


def expert_scores(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """Per-expert scores of the logits: softmax over experts, or the elementwise sigmoid / sqrt-softplus."""
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1)
    if score_function == "sigmoid":
        return torch.sigmoid(logits)
    if score_function == "sqrtsoftplus":
        return torch.nn.functional.softplus(logits).sqrt()
    raise ValueError(f"score function {score_function!r}; valid values: {', '.join(SCORE_FUNCTIONS)}")


def group_limited_topk(scores: torch.Tensor, topk: int, num_groups: int, group_topk: int):
    """megatron-core's ``group_limited_topk``: the top-k of ``scores [T, E]`` within each token's
    ``group_topk`` best groups (a group's score: the sum of its top ``topk // group_topk`` scores)."""
    num_tokens, num_experts = scores.shape
    grouped = scores.view(num_tokens, num_groups, num_experts // num_groups)
    group_scores = grouped.topk(topk // group_topk, dim=-1)[0].sum(dim=-1)
    chosen_groups = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, chosen_groups, 1).bool()
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
    return torch.topk(scores.masked_fill(~expert_mask, float("-inf")), k=topk, dim=-1)


def _chosen(scores: torch.Tensor, selection: Selection) -> torch.Tensor:
    """The experts ``[T, k]`` each token takes by ``scores`` (group-limited when configured), ascending per token.

    Chosen without autograd: the gates are gathered from the differentiable scores at these indices afterwards,
    so the backward keeps one ``[T, k]`` index (the gather's) and nothing of the selection itself."""
    with torch.no_grad():
        if selection.group_topk:
            _, experts = group_limited_topk(scores, selection.topk, selection.num_groups, selection.group_topk)
        else:
            _, experts = torch.topk(scores, k=selection.topk, dim=-1)
        return experts.sort(dim=-1).values


def _take(scores: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``scores.gather(1, experts)`` by advanced indexing, whose backward keeps the indices only (``gather`` keeps
    the whole ``[T, E]`` source too), as int32 (half the bytes; expert and token counts are far below 2**31)."""
    rows = torch.arange(scores.shape[0], device=scores.device, dtype=torch.int32).unsqueeze(1)
    return scores[rows, experts.to(torch.int32)]


def select_experts(logits: torch.Tensor, selection: Selection, expert_bias: Optional[torch.Tensor] = None):
    """``logits [T, E]`` -> ``(gates [T, k], experts [T, k])``, megatron-core's probabilities and indices, with each
    token's experts in ascending order (megatron-core's top-k order differs; the (expert, gate) pairs are the
    same)."""
    if selection.score_function == "softmax":
        if selection.pre_softmax:
            probs = torch.softmax(logits, dim=-1)
            experts = _chosen(probs, selection)
            gates = _take(probs, experts)
        else:
            experts = _chosen(logits, selection)
            gates = torch.softmax(_take(logits, experts), dim=-1)
    else:
        scores = expert_scores(logits, selection.score_function)
        biased = scores if expert_bias is None else scores + expert_bias.to(scores.dtype)
        experts = _chosen(biased, selection)
        gates = _take(scores, experts)
        if selection.topk > 1:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
    if selection.scaling_factor:
        gates = gates * selection.scaling_factor
    return gates, experts


def aux_loss_scores(logits: torch.Tensor, topk: int, score_function: str):
    """megatron-core's ``compute_routing_scores_for_aux_loss``: scores over all experts (softmax, or the
    sigmoid / sqrt-softplus scores normalised per token) and the plain top-k each token would take by them
    (no expert bias, no group limit): ``(scores [T, E], chosen [T, k])``."""
    scores = expert_scores(logits, score_function)
    if score_function != "softmax":
        scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    with torch.no_grad():  # the loads are counts: no gradient, nothing kept for the backward
        chosen = torch.topk(scores, k=topk, dim=-1)[1]
    return scores, chosen
