"""The software stack granular-moe is built and tested on, checked when the package is imported.

megatron-core 0.19.x (Megatron-LM ``core_v0.19.0``) on Python >= 3.12. Earlier megatron-core releases
build their MoE layers through ``ModuleSpec`` rather than 0.19's MLP builders, name their aux-loss tracker,
optimizer and checkpoint APIs differently, and run on Pythons this stack does not: they are refused here,
with the supported versions named, rather than failing later inside a model.
"""

from __future__ import annotations

import sys
from importlib import metadata

SUPPORTED_PYTHON = (3, 12)
SUPPORTED_MEGATRON_CORE = ((0, 19), (0, 20))  # >= 0.19, < 0.20
SUPPORTED_TEXT = "Python >= 3.12 with megatron-core >= 0.19, < 0.20 (Megatron-LM core_v0.19.0)"


class UnsupportedStackError(ImportError):
    """The interpreter or megatron-core is outside the supported stack."""


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def check_stack(python: tuple = sys.version_info[:2], megatron_core: str | None = None) -> None:
    """Raise :class:`UnsupportedStackError` naming the supported versions when this interpreter or the
    installed megatron-core (if any) is outside them."""
    if tuple(python) < SUPPORTED_PYTHON:
        raise UnsupportedStackError(
            f"granular-moe needs {SUPPORTED_TEXT}; this is Python {python[0]}.{python[1]}: run bash install.sh, "
            f"which builds the environment with a Python >= 3.12"
        )
    if megatron_core is None:
        try:
            megatron_core = metadata.version("megatron-core")
        except metadata.PackageNotFoundError:
            return  # the planner and the launchers run without it; the layer's import names it
    low, high = SUPPORTED_MEGATRON_CORE
    if not low <= _release(megatron_core) < high:
        raise UnsupportedStackError(
            f"granular-moe needs {SUPPORTED_TEXT}; megatron-core {megatron_core} is installed: "
            f"pip install 'megatron-core>=0.19,<0.20'"
        )
