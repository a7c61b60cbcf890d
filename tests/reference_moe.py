"""An independent dense fp64 reference of the fine-grained MoE layer, written from DESIGN.md's formulas
with none of the package's code: every expert runs on every token, and a [T, E] gate matrix (zero where
a token is not routed, or was dropped) selects and weights the outputs."""

import math

import torch
import torch.nn.functional as F


def token_choice_gates(logits, topk, capacity_factor=None, drop_policy="probs"):
    """[T, E] gates of top-k routing: softmax, keep top-k, renormalise when k > 1, then capacity."""
    num_tokens, num_experts = logits.shape
    probs = torch.softmax(logits, dim=-1)
    gates = torch.zeros_like(probs)
    for t in range(num_tokens):
        chosen = sorted(range(num_experts), key=lambda e: -float(probs[t, e].detach()))[:topk]
        total = sum(probs[t, e] for e in chosen) if topk > 1 else 1.0
        for e in chosen:
            gates[t, e] = probs[t, e] / total
    if capacity_factor is not None:
        capacity = math.ceil(num_tokens * topk * capacity_factor / num_experts)
        keep = torch.zeros_like(gates, dtype=torch.bool)
        for e in range(num_experts):
            routed = [t for t in range(num_tokens) if gates[t, e] != 0]
            if drop_policy == "probs":
                routed.sort(key=lambda t: -float(gates[t, e].detach()))
            for t in routed[:capacity]:
                keep[t, e] = True
        gates = gates * keep
    return gates


def expert_choice_gates(logits, topk, capacity_factor=None):
    """[T, E] gates of expert-choice routing: each expert takes its C most probable tokens."""
    num_tokens, num_experts = logits.shape
    probs = torch.softmax(logits, dim=-1)
    capacity = min(num_tokens, math.ceil(num_tokens * topk * (capacity_factor or 1.0) / num_experts))
    gates = torch.zeros_like(probs)
    for e in range(num_experts):
        for t in sorted(range(num_tokens), key=lambda t: -float(probs[t, e].detach()))[:capacity]:
            gates[t, e] = probs[t, e]
    return gates


def moe_forward(x, router_weight, weight1, weight2, gates_fn, activation=F.gelu, gated=False):
    """out[t] = sum_e gates[t, e] * MLP_e(x[t]); returns (out, logits, gates)."""
    logits = x @ router_weight.t()
    gates = gates_fn(logits)
    out = torch.zeros_like(x)
    for e in range(weight1.shape[0]):
        h = x @ weight1[e]
        if gated:
            n = h.shape[-1] // 2
            h = activation(h[:, :n]) * h[:, n:]
        else:
            h = activation(h)
        out = out + gates[:, e : e + 1] * (h @ weight2[e])
    return out, logits, gates


def z_loss(logits):
    return (torch.logsumexp(logits, dim=-1) ** 2).mean()


def scored_gates(logits, topk, score="softmax", pre_softmax=False, num_groups=None, group_topk=None, scaling=None,
                 bias=None):
    """[T, E] gates as megatron-core routes (written from its documented rules): the top-k of the selection
    scores (softmax probabilities with pre-softmax, else the logits; sigmoid / sqrt-softplus scores plus the
    expert bias), within each token's best ``group_topk`` groups (a group scores the sum of its top
    ``topk / group_topk`` selection scores) when groups are given; gates: softmax of the chosen logits (or the
    chosen probabilities with pre-softmax), or the chosen scores normalised over them when k > 1."""
    num_tokens, num_experts = logits.shape
    gates = torch.zeros_like(logits)
    for t in range(num_tokens):
        row = logits[t]
        if score == "softmax":
            probs = torch.softmax(row, dim=-1)
            selecting = probs if pre_softmax else row
        else:
            scores = torch.sigmoid(row) if score == "sigmoid" else F.softplus(row).sqrt()
            selecting = scores + (0 if bias is None else bias)
        values = [float(v) for v in selecting.detach()]
        allowed = list(range(num_experts))
        if group_topk:
            size = num_experts // num_groups
            group_score = [sum(sorted(values[g * size:(g + 1) * size], reverse=True)[:topk // group_topk])
                           for g in range(num_groups)]
            best = sorted(range(num_groups), key=lambda g: -group_score[g])[:group_topk]
            allowed = [e for e in allowed if e // size in best]
        chosen = sorted(allowed, key=lambda e: -values[e])[:topk]
        if score == "softmax":
            chosen_gates = probs[chosen] if pre_softmax else torch.softmax(row[chosen], dim=-1)
        else:
            chosen_gates = scores[chosen]
            if topk > 1:
                chosen_gates = chosen_gates / chosen_gates.sum()
        if scaling:
            chosen_gates = chosen_gates * scaling
        for e, g in zip(chosen, chosen_gates):
            gates[t, e] = g
    return gates


def balance_scores(logits, score="softmax"):
    """Scores of the balance losses: softmax over experts, or the sigmoid / sqrt-softplus scores normalised
    per token."""
    if score == "softmax":
        return torch.softmax(logits, dim=-1)
    scores = torch.sigmoid(logits) if score == "sigmoid" else F.softplus(logits).sqrt()
    return scores / scores.sum(dim=-1, keepdim=True)


def switch_loss(scores, topk, loads=None):
    """E * sum_e f_e * P_e over the given tokens: f from the plain top-k of ``scores`` (or ``loads``, routed
    slots per expert over the same number of tokens), P the mean score."""
    num_tokens, num_experts = scores.shape
    if loads is None:
        loads = torch.zeros(num_experts, dtype=scores.dtype)
        for t in range(num_tokens):
            for e in sorted(range(num_experts), key=lambda e: -float(scores[t, e].detach()))[:topk]:
                loads[e] += 1
    f = loads / (num_tokens * topk)
    return num_experts * torch.sum(f * scores.mean(dim=0))


def sequence_switch_loss(scores, topk, seq, batch):
    """The Switch loss of each sequence of an ``[s, b]``-ordered (position-major) token list, averaged."""
    per_sequence = scores.reshape(seq, batch, -1)
    return sum(switch_loss(per_sequence[:, j], topk) for j in range(batch)) / batch


def shared_expert(x, fc1, fc2, activation=F.gelu, gate_weight=None):
    """Megatron's SharedExpertMLP: ``fc2(act(fc1 x))``, times ``sigmoid(x . gate)`` with a gate."""
    out = activation(x @ fc1.t()) @ fc2.t()
    if gate_weight is not None:
        out = out * torch.sigmoid(x @ gate_weight.t())
    return out
