"""Named errors of the scaling planner; all are :class:`~granular_moe.config.GranularMoEConfigError`
(a ``ValueError``), so the command line prints the message and exits non-zero."""

from __future__ import annotations

import math

from granular_moe.config import GranularMoEConfigError


class ScalingInputError(GranularMoEConfigError):
    """A budget, size or granularity outside its valid values."""


class ImpossibleConstraintsError(GranularMoEConfigError):
    """Constraints that no configuration satisfies (e.g. a budget too small for one layer)."""


class ThroughputFileError(GranularMoEConfigError):
    """A step-time file the wall-clock planner cannot use."""


def require_positive(value, what: str) -> float:
    """``value`` as a float if it is a finite number > 0, else :class:`ScalingInputError` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ScalingInputError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


def require_power_of_two(value, what: str) -> int:
    """``value`` if it is a power of two (1, 2, 4, ...), else :class:`ScalingInputError` naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ScalingInputError(f"{what} must be a power of two (1, 2, 4, 8, ...), got {value!r}")
    return value
