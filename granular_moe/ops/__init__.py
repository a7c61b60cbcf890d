"""The layer's compute kernels behind one switch (``--moe-kernels``).

``torch`` is the plain PyTorch reference (:mod:`granular_moe.ops.reference`); ``triton`` the Triton
kernels (:mod:`granular_moe.ops.triton`), on CUDA tensors, or on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``); ``auto`` picks Triton on CUDA devices when Triton imports, else torch.
Every backend exposes ``dispatch_plan``, ``permute``, ``grouped_mlp`` and ``combine``.
"""

from __future__ import annotations

import functools
import importlib.util
from types import ModuleType
from typing import TYPE_CHECKING, Union

import torch

from granular_moe.config import GranularMoEConfigError
from granular_moe.ops import reference
from granular_moe.ops.plan import DispatchPlan

if TYPE_CHECKING:
    from granular_moe.ops.triton import TritonKernels

KERNEL_BACKENDS = ("auto", "torch", "triton")

__all__ = ["DispatchPlan", "KERNEL_BACKENDS", "check_kernel_backend", "kernels_for"]


def check_kernel_backend(backend: str) -> None:
    if backend not in KERNEL_BACKENDS:
        raise GranularMoEConfigError(
            f"--moe-kernels {backend!r} is not valid; valid values: {', '.join(KERNEL_BACKENDS)}"
        )


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Triton is installed (the import of the kernels is left to the first use)."""
    return importlib.util.find_spec("triton") is not None


def kernels_for(backend: str, device) -> Union[ModuleType, "TritonKernels"]:
    """The kernels implementing ``dispatch_plan``, ``permute``, ``grouped_mlp`` and ``combine`` for
    ``backend`` on tensors of ``device``."""
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
