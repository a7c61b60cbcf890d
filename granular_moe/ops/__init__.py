"""The layer's compute kernels behind one switch (``--moe-kernels``).

``torch`` is the plain PyTorch reference (:mod:`granular_moe.ops.reference`); ``auto`` picks the fastest
backend available on the tensors' device.
"""

from __future__ import annotations

from types import ModuleType

from granular_moe.config import GranularMoEConfigError
from granular_moe.ops import reference
from granular_moe.ops.plan import DispatchPlan

KERNEL_BACKENDS = ("auto", "torch")

__all__ = ["DispatchPlan", "KERNEL_BACKENDS", "check_kernel_backend", "kernels_for"]


def check_kernel_backend(backend: str) -> None:
    if backend not in KERNEL_BACKENDS:
        raise GranularMoEConfigError(
            f"--moe-kernels {backend!r} is not valid; valid values: {', '.join(KERNEL_BACKENDS)}"
        )


def kernels_for(backend: str, device) -> ModuleType:
    """The module implementing ``dispatch_plan``, ``grouped_mlp`` and ``combine`` for ``backend``."""
    check_kernel_backend(backend)
    return reference
