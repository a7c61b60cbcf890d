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


def switch_loss(logits, topk):
    """E * sum_i f_i P_i, from the definition (f: share of the T*k routed slots, P: mean probability)."""
    num_tokens, num_experts = logits.shape
    probs = torch.softmax(logits, dim=-1)
    chosen = probs.topk(topk, dim=-1).indices
    f = torch.stack([(chosen == e).sum() for e in range(num_experts)]).double() / (num_tokens * topk)
    return num_experts * sum(f[e] * probs[:, e].mean() for e in range(num_experts))


def z_loss(logits):
    return (torch.logsumexp(logits, dim=-1) ** 2).mean()
