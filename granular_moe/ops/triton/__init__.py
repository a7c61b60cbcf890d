"""Triton kernels of the layer (``--moe-kernels triton``, and ``auto`` on CUDA devices).

Every kernel has a plain PyTorch reference of the same signature in :mod:`granular_moe.ops.reference`.
The kernels compile for the GPU, or run on the CPU under Triton's interpreter when ``TRITON_INTERPRET=1``
is set before this package is first imported (how the tests run them).

The five ops are torch operators (``torch.library.custom_op``, namespace ``granular_moe``: ``dispatch_plan``,
``expert_parallel_plan``, ``permute``, ``grouped_mlp``, ``combine``, and the backward operators
``scatter_add_rows``, ``grouped_mlp_backward``, ``combine_backward``), each with a fake implementation (shapes
only; the expert-parallel plan's row count is data-dependent) and its autograd formula registered, so that
``torch.compile`` traces the layer through them.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import triton

from granular_moe.config import GranularMoEConfigError
from granular_moe.ops import reference
from granular_moe.ops.triton import grouped_gemm, movement, routing
from granular_moe.ops.triton.activations import FUSED_ACTIVATIONS, activation_name

# Triton decides at decoration time whether a kernel is compiled or interpreted.
INTERPRETED = bool(triton.knobs.runtime.interpret)
GEMM_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TritonKernels:
    """``dispatch_plan``, ``permute``, ``grouped_mlp`` and ``combine`` in Triton (and the reference's
    ``expert_parallel_plan`` as an operator).

    ``grouped_mlp`` fuses the activations in :data:`FUSED_ACTIVATIONS` for fp16, bf16 and fp32. Given
    anything else it runs the torch reference when ``fallback_to_torch`` (``--moe-kernels auto``) and
    raises an error naming ``--moe-kernels`` otherwise (``--moe-kernels triton``).
    """

    dispatch_plan = staticmethod(routing.dispatch_plan)
    # Sorting a rank's assignments by destination is a few torch ops on the GPU (the reference's, as an operator).
    expert_parallel_plan = staticmethod(routing.expert_parallel_plan)
    permute = staticmethod(movement.permute)
    combine = staticmethod(movement.combine)

    def __init__(self, fallback_to_torch: bool):
        self.fallback_to_torch = fallback_to_torch

    def grouped_mlp(
        self,
        x: torch.Tensor,
        tokens_per_expert: torch.Tensor,
        weight1: torch.Tensor,
        weight2: torch.Tensor,
        activation: Callable,
        gated: bool,
        gather_index: Optional[torch.Tensor] = None,
        probs: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """See :func:`granular_moe.ops.reference.grouped_mlp`."""
        name = activation_name(activation)
        problem = None
        if name is None:
            problem = f"the activation {activation!r} is not fused (fused: {', '.join(FUSED_ACTIVATIONS)})"
        elif not x.dtype == weight1.dtype == weight2.dtype or x.dtype not in GEMM_DTYPES:
            problem = (
                f"dtypes x {x.dtype}, weight1 {weight1.dtype}, weight2 {weight2.dtype} are not supported "
                "(one of float16, bfloat16, float32 for all three)"
            )
        if problem is None:
            return grouped_gemm.grouped_mlp(x, tokens_per_expert, weight1, weight2, name, gated, gather_index, probs)
        if self.fallback_to_torch:
            return reference.grouped_mlp(x, tokens_per_expert, weight1, weight2, activation, gated, gather_index,
                                         probs)
        raise GranularMoEConfigError(f"--moe-kernels triton: {problem}; use --moe-kernels auto or torch")


STRICT = TritonKernels(fallback_to_torch=False)
WITH_TORCH_FALLBACK = TritonKernels(fallback_to_torch=True)
