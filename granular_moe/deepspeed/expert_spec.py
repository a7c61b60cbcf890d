"""What one expert of a :class:`~granular_moe.deepspeed.GranularMoE` layer is, from the ``expert`` argument
DeepSpeed's ``MoE`` takes, and how a base expert is cut into ``G`` fine-grained ones.

``expert`` is either the base expert's FFN hidden size (an int; the activation from ``activation``) or a module,
whose weights every expert then starts from (DeepSpeed's ``MoE`` deep-copies its ``expert`` module into every local
expert): ``nn.Sequential(nn.Linear(h, f, bias=False), <nn.GELU | nn.ReLU | nn.SiLU>, nn.Linear(f, h, bias=False))``,
or a gated MLP with ``gate_proj``, ``up_proj`` and ``down_proj`` linear layers without bias and an ``act_fn`` (SiLU:
SwiGLU, GELU: GeGLU), the layout of the MLPs of Hugging Face's Llama, Qwen and DeepSeek models.

Cutting (granularity ``G``): fine expert ``i`` holds the hidden units of slice ``i % G`` of base expert ``i // G``
(with a gated unit the same rows of both halves), the rule of the main job's upcycling
(:func:`granular_moe.training.upcycle.upcycled_expert_weights`); the factor ``G`` that makes the ``G`` slices' outputs
add up to the base expert's when each gets ``1/G`` of its gate goes on the second matrix alone, where it is exact
for any activation (upcycling spreads it over both matrices, exact for ReLU only).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from granular_moe.config import GranularMoEConfigError

ACTIVATIONS = {  # name -> (activation on the first matrix's output, gated linear unit)
    "gelu": (F.gelu, False),
    "relu": (F.relu, False),
    "silu": (F.silu, False),
    "swiglu": (F.silu, True),
    "geglu": (F.gelu, True),
}


@dataclass
class ExpertSpec:
    """One base expert: ``hidden -> ffn_hidden_size -> hidden``. ``fc1 [ffn (x2 gated: gate rows first), hidden]``
    and ``fc2 [hidden, ffn]`` (``nn.Linear`` layouts) when the experts start from given weights."""

    ffn_hidden_size: int
    activation: Callable
    gated: bool
    fc1: Optional[torch.Tensor] = None
    fc2: Optional[torch.Tensor] = None


def _activation_of(module: torch.nn.Module, where: str) -> Callable:
    if isinstance(module, torch.nn.GELU):
        return F.gelu if module.approximate == "none" else functools.partial(F.gelu, approximate=module.approximate)
    if isinstance(module, torch.nn.ReLU):
        return F.relu
    if isinstance(module, torch.nn.SiLU):
        return F.silu
    raise GranularMoEConfigError(
        f"expert: the activation {type(module).__name__} of {where} is not supported; valid: nn.GELU, nn.ReLU, nn.SiLU")


def _linear(module, hidden: int, where: str, shape: tuple) -> torch.Tensor:
    if not isinstance(module, torch.nn.Linear) or module.bias is not None or tuple(module.weight.shape) != shape:
        raise GranularMoEConfigError(
            f"expert: {where} must be nn.Linear without bias of weight shape {list(shape)} (hidden_size {hidden}); "
            f"got {module!r} (the grouped experts have no biases)")
    return module.weight.detach()


def expert_spec(expert, hidden_size: int, activation: str) -> ExpertSpec:
    """The :class:`ExpertSpec` of ``expert`` (an int FFN size, or a module as the module docstring lists); raises
    :class:`~granular_moe.config.GranularMoEConfigError` naming ``expert`` or ``activation``."""
    if isinstance(expert, bool) or not isinstance(expert, (int, torch.nn.Module)):
        raise GranularMoEConfigError(
            f"expert must be the expert FFN hidden size (an int) or an expert module, got {type(expert).__name__}")
    if isinstance(expert, int):
        if expert < 1:
            raise GranularMoEConfigError(f"expert (the expert FFN hidden size) must be >= 1, got {expert}")
        if activation not in ACTIVATIONS:
            raise GranularMoEConfigError(
                f"activation {activation!r} is not valid; valid values: {', '.join(ACTIVATIONS)}")
        function, gated = ACTIVATIONS[activation]
        return ExpertSpec(expert, function, gated)
    if isinstance(expert, torch.nn.Sequential) and len(expert) == 3:
        first, act, second = expert
        ffn = getattr(first, "out_features", None)
        fc1 = _linear(first, hidden_size, "expert[0]", (ffn, hidden_size))
        fc2 = _linear(second, hidden_size, "expert[2]", (hidden_size, ffn))
        return ExpertSpec(ffn, _activation_of(act, "expert[1]"), False, fc1, fc2)
    if all(hasattr(expert, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        ffn = getattr(expert.gate_proj, "out_features", None)
        name = type(expert).__name__
        gate = _linear(expert.gate_proj, hidden_size, f"{name}.gate_proj", (ffn, hidden_size))
        up = _linear(expert.up_proj, hidden_size, f"{name}.up_proj", (ffn, hidden_size))
        down = _linear(expert.down_proj, hidden_size, f"{name}.down_proj", (hidden_size, ffn))
        return ExpertSpec(ffn, _activation_of(expert.act_fn, f"{name}.act_fn"), True, torch.cat([gate, up]), down)
    raise GranularMoEConfigError(
        f"expert: a {type(expert).__name__} module is not supported; valid: the expert FFN hidden size (an int), "
        f"nn.Sequential(nn.Linear(h, f, bias=False), activation, nn.Linear(f, h, bias=False)), or a gated MLP with "
        f"gate_proj, up_proj, down_proj and act_fn")


def cut_experts(fc1: torch.Tensor, fc2: torch.Tensor, gated: bool, granularity: int, expert_ids,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The fine-grained experts ``expert_ids`` (global indices among ``E*G``) cut from one base expert (``fc1
    [ffn (x2), hidden]``, ``fc2 [hidden, ffn]``, each id's base expert being this one): the layer's ``weight1 [n,
    hidden, ffn/G (x2)]`` and ``weight2 [n, ffn/G, hidden]``, the latter times ``G`` (see the module docstring).
    ``G = 1`` copies the expert."""
    from granular_moe.training.upcycle import upcycled_expert_weights

    ids = list(expert_ids)
    # upcycling's cut with its output scale (G / moe_router_topk_scaling_factor for a renormalising router) at 1
    unscaled = SimpleNamespace(gated_linear_unit=gated, activation_func=None, params_dtype=torch.float64,
                               moe_router_topk=2, num_moe_experts=granularity,
                               moe_router_topk_scaling_factor=float(granularity))
    weight1, weight2 = upcycled_expert_weights(fc1, fc2, unscaled, granularity, ids)
    return weight1.to(dtype), (weight2 * granularity).to(dtype)


class ResidualMLP(torch.nn.Module):
    """A dense MLP of one base expert's shape (``fc1``, ``fc2`` without bias), the Residual MoE's for an int
    ``expert``."""

    def __init__(self, hidden_size: int, spec: ExpertSpec, dtype: torch.dtype):
        super().__init__()
        self.activation, self.gated = spec.activation, spec.gated
        width = spec.ffn_hidden_size * (2 if spec.gated else 1)
        self.fc1 = torch.nn.Linear(hidden_size, width, bias=False, dtype=dtype)
        self.fc2 = torch.nn.Linear(spec.ffn_hidden_size, hidden_size, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.fc2(self.activation(gate) * up)
        return self.fc2(self.activation(h))
