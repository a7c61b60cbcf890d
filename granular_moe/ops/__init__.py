"""The layer's compute kernels behind one switch (``--moe-kernels``).

``torch`` is the plain PyTorch reference (:mod:`granular_moe.ops.reference`); ``triton`` the Triton
kernels (:mod:`granular_moe.ops.triton`), on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``); ``auto`` picks Triton on CUDA devices when Triton imports, else torch.
Every backend implements :class:`Kernels`: ``dispatch_plan``, ``expert_parallel_plan``, ``permute``,
``grouped_mlp`` and ``combine``, with the reference's signatures.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Callable, Optional, Protocol

import torch

from granular_moe.config import GranularMoEConfigError
from granular_moe.ops import reference
from granular_moe.ops.plan import DispatchPlan, ExpertParallelPlan

KERNEL_BACKENDS = ("auto", "torch", "triton")

__all__ = ["DispatchPlan", "ExpertParallelPlan", "KERNEL_BACKENDS", "Kernels", "check_kernel_backend", "kernels_for"]


class Kernels(Protocol):
    """The layer's five ops, which every backend implements with the signatures of
    :mod:`granular_moe.ops.reference` (its docstrings say what each computes)."""

    def dispatch_plan(self, expert_index: torch.Tensor, token_offsets: torch.Tensor,
                      num_experts: int) -> DispatchPlan: ...

    def expert_parallel_plan(self, expert_index: torch.Tensor, token_offsets: torch.Tensor, num_local_experts: int,
                             ep_size: int) -> ExpertParallelPlan: ...

    def permute(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor: ...

    def grouped_mlp(self, x: torch.Tensor, tokens_per_expert: torch.Tensor, weight1: torch.Tensor,
                    weight2: torch.Tensor, activation: Callable, gated: bool,
                    gather_index: Optional[torch.Tensor] = None,
                    probs: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    def combine(self, expert_output: torch.Tensor, weight: Optional[torch.Tensor], row_of_assignment: torch.Tensor,
                token_offsets: torch.Tensor) -> torch.Tensor: ...


KERNEL_OPS = tuple(name for name in vars(Kernels) if not name.startswith("_"))


def check_kernel_backend(backend: str) -> None:
    if backend not in KERNEL_BACKENDS:
        raise GranularMoEConfigError(
            f"--moe-kernels {backend!r} is not valid; valid values: {', '.join(KERNEL_BACKENDS)}"
        )


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Triton is installed (the import of the kernels is left to the first use)."""
    return importlib.util.find_spec("triton") is not None


def kernels_for(backend: str, device) -> Kernels:
    """The :class:`Kernels` of ``backend`` for tensors of ``device``."""
    check_kernel_backend(backend)
    on_cuda = torch.device(device).type == "cuda"
    if backend == "torch" or (backend == "auto" and not (on_cuda and triton_available())):
        return reference
    if not triton_available():
        raise GranularMoEConfigError("--moe-kernels triton needs Triton installed; use --moe-kernels auto or torch")
    from granular_moe.ops import triton as triton_kernels

    if backend == "auto":
        return triton_kernels.WITH_TORCH_FALLBACK
    if not on_cuda and not triton_kernels.INTERPRETED:
        raise GranularMoEConfigError(
            f"--moe-kernels triton on {torch.device(device).type} tensors runs under Triton's interpreter only: "
            "set TRITON_INTERPRET=1 before granular_moe.ops.triton is first imported, "
            "or use --moe-kernels auto or torch"
        )
    return triton_kernels.STRICT
