"""Compute-optimal ``(N, D, G)`` for a FLOPs budget (Krajewski et al. 2024, arXiv 2402.07871, Section 6.2).

    minimise L(N, D, G)  subject to  F = (12 d_model**2 c_f + d_model E G c_r) D n_blocks,
                                     N = d_model**2 (8E + 4) n_blocks,  d_model = 64 n_blocks

For each candidate ``G`` (powers of two, as in the paper; the authors' code tries 1..256) the problem is one-
dimensional in ``n_blocks``; the loss is convex in ``log n_blocks`` (a decreasing and an increasing convex
power term), so Brent's method finds the global minimum, as in the paper. Optional caps on the model size
and on the available tokens bound ``n_blocks``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from granular_moe.scaling.errors import ImpossibleConstraintsError, require_positive, require_power_of_two
from granular_moe.scaling.flops import PaperArchitecture
from granular_moe.scaling.law import DENSE, MOE_E64, ScalingLaw
from granular_moe.scaling.minimize import minimize_bounded

GRANULARITIES = tuple(2**i for i in range(9))  # 1..256: `granularity_range` of the authors' solver
_LOG_BUDGET_TOLERANCE = 1e-10  # budget searches stop at a relative width of 1e-10


@dataclass(frozen=True)
class ComputeOptimum:
    """The loss-minimising configuration for a budget (``n_blocks`` continuous)."""

    flops: float
    law: ScalingLaw
    architecture: PaperArchitecture
    granularity: int
    tokens: float
    loss: float
    active_constraints: tuple[str, ...] = ()

    @property
    def params(self) -> float:
        return self.architecture.params

    @property
    def active_params(self) -> float:
        return self.architecture.active_params


def check_granularities(granularities: Sequence[int]) -> tuple[int, ...]:
    """Candidate granularities: a non-empty list of powers of two (``--granularities``)."""
    if not granularities:
        raise ImpossibleConstraintsError("--granularities is empty; valid values: powers of two such as 1,2,4,...,64")
    return tuple(sorted({require_power_of_two(g, "--granularities entry") for g in granularities}))


def _log_blocks_bounds(flops, law, granularity, max_params, max_tokens) -> dict[float, str]:
    """The ends of the ``log n_blocks`` range the constraints allow, each with its constraint's name."""
    expansion = law.expansion_rate
    low, low_name = 1.0, "at least one block"
    if PaperArchitecture(low, expansion).tokens_for_flops(flops, granularity) < 1:
        raise ImpossibleConstraintsError(
            f"a budget of {flops:.3g} FLOPs does not train one block of the paper's family (d_model 64) on one "
            f"token at G={granularity}: raise --flops"
        )
    # n_blocks where D would fall to one token: the budget's own upper end.
    high, high_name = _solve_increasing(
        lambda n: -PaperArchitecture(n, expansion).tokens_for_flops(flops, granularity), -1.0
    ), "the budget"
    if max_params is not None:
        cap = (max_params / PaperArchitecture(1.0, expansion).params) ** (1 / 3)
        if cap < high:
            high, high_name = cap, f"--max-params {max_params:.3g}"
    if max_tokens is not None:
        floor = _solve_increasing(
            lambda n: -PaperArchitecture(n, expansion).tokens_for_flops(flops, granularity), -max_tokens
        )
        if floor > low:
            low, low_name = floor, f"--max-tokens {max_tokens:.3g}"
    if low > high:
        raise ImpossibleConstraintsError(
            f"no model of the paper's family fits a budget of {flops:.3g} FLOPs at G={granularity} with "
            f"{low_name} and {high_name}: raise the budget or relax --max-params / --max-tokens"
        )
    return {math.log(low): low_name, math.log(high): high_name}


def _solve_increasing(f: Callable[[float], float], target: float) -> float:
    """The ``n >= 1`` where an increasing ``f`` reaches ``target`` (1 if it starts above it)."""
    low, high = 1.0, 2.0
    if f(low) >= target:
        return low
    while f(high) < target:
        low, high = high, high * 2
    for _ in range(200):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if f(middle) < target else (low, middle)
    return high


def optimal_for_granularity(
    flops: float,
    granularity: int = 1,
    law: ScalingLaw = MOE_E64,
    max_params: float | None = None,
    max_tokens: float | None = None,
) -> ComputeOptimum:
    """The compute-optimal model size and tokens for ``flops`` at a fixed ``granularity``."""
    flops = require_positive(flops, "FLOPs budget (--flops)")
    if max_params is not None:
        max_params = require_positive(max_params, "--max-params")
    if max_tokens is not None:
        max_tokens = require_positive(max_tokens, "--max-tokens")
    expansion = law.expansion_rate
    log_bounds = _log_blocks_bounds(flops, law, granularity, max_params, max_tokens)

    def loss_at(log_blocks: float) -> float:
        architecture = PaperArchitecture(math.exp(log_blocks), expansion)
        tokens = architecture.tokens_for_flops(flops, granularity)
        return law.loss_unchecked(architecture.params, tokens, granularity)

    log_blocks = minimize_bounded(loss_at, min(log_bounds), max(log_bounds))
    architecture = PaperArchitecture(math.exp(log_blocks), expansion)
    tokens = architecture.tokens_for_flops(flops, granularity)
    active = tuple(name for bound, name in log_bounds.items() if log_blocks == bound and name != "the budget")
    return ComputeOptimum(
        flops=flops,
        law=law,
        architecture=architecture,
        granularity=granularity,
        tokens=tokens,
        loss=law.loss_unchecked(architecture.params, tokens, granularity),
        active_constraints=active,
    )


def compute_optimal(
    flops: float,
    law: ScalingLaw = MOE_E64,
    granularities: Sequence[int] = GRANULARITIES,
    max_params: float | None = None,
    max_tokens: float | None = None,
) -> ComputeOptimum:
    """The ``(N, D, G)`` of lowest predicted loss for a budget of ``flops`` (dense laws: ``G = 1``)."""
    candidates = (1,) if law.is_dense else check_granularities(granularities)
    return min(
        (optimal_for_granularity(flops, g, law, max_params, max_tokens) for g in candidates),
        key=lambda optimum: optimum.loss,
    )


def dense_compute_optimal(flops: float, max_params: float | None = None, max_tokens: float | None = None):
    """The compute-optimal dense Transformer (Table 1's dense law, ``F = 6 N D``)."""
    return compute_optimal(flops, DENSE, max_params=max_params, max_tokens=max_tokens)


def flops_to_match(loss: float, solve: Callable[[float], ComputeOptimum], start: float) -> float:
    """The budget at which ``solve(budget).loss`` reaches ``loss`` (the paper's Figure 1b "FLOPs needed");
    ``solve``'s optimal loss decreases with the budget. ``start`` is any budget to search from."""
    low = high = start
    while solve(high).loss > loss:
        high *= 10
        if high > 1e60:
            raise ImpossibleConstraintsError(f"no budget up to 1e60 FLOPs reaches a loss of {loss:.4g}")
    while solve(low).loss <= loss:
        low /= 10
    log_low, log_high = math.log(low), math.log(high)
    while log_high - log_low > _LOG_BUDGET_TOLERANCE:
        middle = 0.5 * (log_low + log_high)
        if solve(math.exp(middle)).loss > loss:
            log_low = middle
        else:
            log_high = middle
    return math.exp(log_high)


def budget_for_active_params(
    active_params: float, law: ScalingLaw = MOE_E64, granularities: Sequence[int] = GRANULARITIES
) -> ComputeOptimum:
    """The budget for which a model of ``active_params`` (``12 d_model**2 n_blocks``) is compute-optimal, and
    its ``D`` and ``G``: how the paper's Table 2 is made (the authors' code searches the FLOPs at which the
    optimal ``N`` equals the model's)."""
    target = PaperArchitecture.from_active_params(active_params, law.expansion_rate).params

    def solve(flops: float) -> ComputeOptimum:
        return compute_optimal(flops, law, granularities)

    # N at the optimum grows with the budget (with jumps where G changes): bisect on log F.
    log_low, log_high = math.log(1e10), math.log(1e40)
    if not solve(math.exp(log_low)).params < target < solve(math.exp(log_high)).params:
        raise ImpossibleConstraintsError(
            f"--active-params {active_params:.3g} is compute-optimal for no budget in 1e10-1e40 FLOPs"
        )
    while log_high - log_low > _LOG_BUDGET_TOLERANCE:
        middle = 0.5 * (log_low + log_high)
        if solve(math.exp(middle)).params < target:
            log_low = middle
        else:
            log_high = middle
    return solve(math.exp(log_high))
