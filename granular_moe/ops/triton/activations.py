"""Activations the Triton kernels fuse, by name: the forward value and the derivative, in fp32.

:func:`activation_name` maps the Python callable of a Megatron config (``config.activation_func``) to the
name the kernels take as a compile-time constant, or ``None`` for one they do not fuse.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

FUSED_ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "quick_gelu")

_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_TWO_SQRT_2_OVER_PI = tl.constexpr(1.5957691216057308)  # 2 * sqrt(2 / pi)
_GELU_TANH_CUBIC = tl.constexpr(0.044715)
_QUICK_GELU_SCALE = tl.constexpr(1.702)


def _megatron_activations() -> dict:
    from megatron.core.activations import fast_gelu, quick_gelu
    from megatron.core.transformer.utils import openai_gelu

    return {fast_gelu: "gelu_tanh", openai_gelu: "gelu_tanh", quick_gelu: "quick_gelu"}


def activation_name(activation: Callable) -> Optional[str]:
    """The fused name of ``activation`` (one of :data:`FUSED_ACTIVATIONS`), or ``None``."""
    if activation is F.gelu:
        return "gelu"
    if activation is F.silu:
        return "silu"
    if isinstance(activation, functools.partial) and activation.func is F.gelu and not activation.args:
        approximate = activation.keywords.get("approximate", "none")
        if set(activation.keywords) <= {"approximate"}:
            return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
        return None
    if isinstance(activation, torch.nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(activation.approximate)
    if isinstance(activation, torch.nn.SiLU):
        return "silu"
    try:
        return _megatron_activations().get(activation)
    except (ImportError, TypeError):  # no megatron-core, or an unhashable callable
        return None


@triton.jit
def apply_activation(x, ACTIVATION: tl.constexpr):
    """``act(x)`` for fp32 ``x`` (sigmoids written out: see :mod:`granular_moe.ops.triton.primitives`)."""
    if ACTIVATION == "gelu":
        return 0.5 * x * (1.0 + tl.math.erf(x * _SQRT_HALF))
    elif ACTIVATION == "gelu_tanh":
        # 0.5 * (1 + tanh(u)) == sigmoid(2u), u = sqrt(2 / pi) * (x + 0.044715 x^3)
        return x / (1.0 + tl.exp(-((x + x * x * x * _GELU_TANH_CUBIC) * _TWO_SQRT_2_OVER_PI)))
    elif ACTIVATION == "silu":
        return x / (1.0 + tl.exp(-x))
    else:
        tl.static_assert(ACTIVATION == "quick_gelu", "unknown activation")
        return x / (1.0 + tl.exp(-(x * _QUICK_GELU_SCALE)))


@triton.jit
def activation_derivative(x, ACTIVATION: tl.constexpr):
    """``act'(x)`` for fp32 ``x``."""
    if ACTIVATION == "gelu":
        return 0.5 * (1.0 + tl.math.erf(x * _SQRT_HALF)) + x * _INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    elif ACTIVATION == "gelu_tanh":
        s = 1.0 / (1.0 + tl.exp(-((x + x * x * x * _GELU_TANH_CUBIC) * _TWO_SQRT_2_OVER_PI)))
        du = (1.0 + x * x * _GELU_TANH_CUBIC * 3.0) * _TWO_SQRT_2_OVER_PI
        return s + x * s * (1.0 - s) * du
    elif ACTIVATION == "silu":
        s = 1.0 / (1.0 + tl.exp(-x))
        return s * (1.0 + x * (1.0 - s))
    else:
        tl.static_assert(ACTIVATION == "quick_gelu", "unknown activation")
        s = 1.0 / (1.0 + tl.exp(-(x * _QUICK_GELU_SCALE)))
        return s + x * s * (1.0 - s) * _QUICK_GELU_SCALE
