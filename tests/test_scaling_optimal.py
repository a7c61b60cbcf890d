"""The compute-optimal solver: Brent's method, a brute-force grid, the paper's Tables 2, 6 and 9."""

import math
from dataclasses import replace

import numpy as np
import pytest

from granular_moe.scaling import (
    MOE_E16,
    MOE_E64,
    ImpossibleConstraintsError,
    PaperArchitecture,
    ScalingInputError,
    budget_for_active_params,
    compute_optimal,
    dense_compute_optimal,
    optimal_for_granularity,
)
from granular_moe.scaling.minimize import minimize_bounded
from granular_moe.scaling.optimal import GRANULARITIES, flops_to_match


def test_brent_finds_interior_and_boundary_minima():
    assert minimize_bounded(lambda x: (x - 2.0) ** 2, 0.0, 5.0) == pytest.approx(2.0, abs=1e-7)
    assert minimize_bounded(lambda x: math.exp(x) - 3 * x, -5.0, 5.0) == pytest.approx(math.log(3), abs=1e-7)
    assert minimize_bounded(lambda x: x, 1.0, 3.0) == 1.0  # increasing: the lower end, exactly
    assert minimize_bounded(lambda x: -x, 1.0, 3.0) == 3.0
    calls = []
    minimize_bounded(lambda x: calls.append(x) or (x - 0.3) ** 4, -1.0, 1.0)
    assert len(calls) < 120


def brute_force(flops, law, granularities, max_params=None, points=40001):
    """Grid over log n_blocks for every G: the lowest loss and its (G, n_blocks)."""
    best = (math.inf, None, None)
    n_blocks = np.logspace(0, 4, points)
    for g in granularities:
        arch = PaperArchitecture(n_blocks, law.expansion_rate)
        params = arch.params
        tokens = flops / arch.flops_per_token(g).total
        loss = law.c + (law.g / g**law.gamma + law.a) / params**law.alpha + law.b / tokens**law.beta
        if max_params is not None:
            loss = np.where(params <= max_params, loss, np.inf)
        i = int(np.argmin(loss))
        if loss[i] < best[0]:
            best = (float(loss[i]), g, float(n_blocks[i]))
    return best


@pytest.mark.parametrize("flops, law", [(1e19, MOE_E64), (3e22, MOE_E64), (1e25, MOE_E64), (1e21, MOE_E16)])
def test_solver_matches_brute_force_grid(flops, law):
    loss, granularity, n_blocks = brute_force(flops, law, GRANULARITIES)
    optimum = compute_optimal(flops, law)
    assert optimum.granularity == granularity
    assert optimum.loss <= loss + 1e-12  # never worse than any grid point
    assert optimum.loss == pytest.approx(loss, abs=1e-8)
    assert optimum.architecture.n_blocks == pytest.approx(n_blocks, rel=2e-3)  # within ~4 grid steps
    assert optimum.architecture.training_flops(optimum.tokens, optimum.granularity) == pytest.approx(flops)
    assert optimum.active_constraints == ()


def test_constrained_solver_matches_brute_force_and_reports_the_constraint():
    loss, granularity, n_blocks = brute_force(1e22, MOE_E64, GRANULARITIES, max_params=2e10)
    optimum = compute_optimal(1e22, MOE_E64, max_params=2e10)
    assert optimum.granularity == granularity
    assert loss - 1e-4 < optimum.loss <= loss  # at the cap itself, between the grid's last points below it
    assert optimum.params == pytest.approx(2e10)
    assert optimum.active_constraints == ("--max-params 2e+10",)
    assert optimum.loss > compute_optimal(1e22, MOE_E64).loss


def test_token_cap_forces_a_larger_model():
    free = compute_optimal(1e21, MOE_E64)
    capped = compute_optimal(1e21, MOE_E64, max_tokens=free.tokens / 4)
    assert capped.tokens == pytest.approx(free.tokens / 4)
    assert capped.params > free.params and capped.loss > free.loss
    assert capped.active_constraints == (f"--max-tokens {free.tokens / 4:.3g}",)


# Table 2 (N = 64 x N_act, D, G, FLOPs, loss) with the bootstrap 10th-90th percentiles of D from Table 6
TABLE_2 = [
    (100e6, 4.37e9, 8, 2.95e18, 3.133, (2.97e9, 5.98e9)),
    (1e9, 28.94e9, 16, 1.93e20, 2.491, (21.17e9, 40.73e9)),
    (3e9, 72.90e9, 16, 1.41e21, 2.245, (50.20e9, 105.88e9)),
    (7e9, 137.60e9, 32, 6.46e21, 2.076, (101.06e9, 205.40e9)),
    (70e9, 941.07e9, 32, 4.16e23, 1.694, (638.49e9, 1.59e12)),
    (300e9, 2.96e12, 64, 5.69e24, 1.503, (1.99e12, 5.62e12)),
    (1e12, 7.94e12, 64, 4.97e25, 1.367, (5.29e12, 16.87e12)),
]


@pytest.mark.parametrize("active, tokens, granularity, flops, loss, tokens_interval", TABLE_2)
def test_reproduces_table_2(active, tokens, granularity, flops, loss, tokens_interval):
    """Table 2 was computed from unrounded fitted constants; with Table 1's printed ones (2-3 digits) G is
    exact and D, FLOPs within 5%, the loss within 0.015 (alpha's rounding alone moves it by up to 0.02)."""
    optimum = budget_for_active_params(active, MOE_E64)
    assert optimum.active_params == pytest.approx(active, rel=1e-6)
    assert optimum.granularity == granularity
    assert optimum.tokens == pytest.approx(tokens, rel=0.05)
    assert optimum.flops == pytest.approx(flops, rel=0.05)
    assert optimum.loss == pytest.approx(loss, abs=0.015)
    assert tokens_interval[0] < optimum.tokens < tokens_interval[1]


# Constants inside Table 1's printed rounding (a 18.1, alpha 0.115, b 30.8, beta 0.147, g 2.1, gamma 0.58,
# each +- half a unit of its last digit; c 0.47 +- 0.005), least-squares fitted to Table 2's D, FLOPs and loss
# through the optimum's first-order condition. That such constants exist and take the solver to Table 2 at
# about its printed precision (the last digit of the loss, D and FLOPs within 0.4% and 0.6%) shows that the
# solver and FLOPs model are the paper's and that the 3-4% gap of the printed constants is their rounding.
TABLE_1_WITHIN_ROUNDING = replace(MOE_E64, a=18.05, alpha=0.11453, b=30.85, beta=0.14656, g=2.05, gamma=0.585,
                                  c=0.4696)


@pytest.mark.parametrize("active, tokens, granularity, flops, loss, tokens_interval", TABLE_2)
def test_table_2_at_printed_precision_with_constants_inside_table_1_rounding(active, tokens, granularity, flops,
                                                                            loss, tokens_interval):
    optimum = budget_for_active_params(active, TABLE_1_WITHIN_ROUNDING)
    assert optimum.granularity == granularity
    assert optimum.tokens == pytest.approx(tokens, rel=0.005)
    assert optimum.flops == pytest.approx(flops, rel=0.006)
    assert optimum.loss == pytest.approx(loss, abs=0.001)


# Appendix D, Table 9 (E = 16): bootstrap 10th-90th percentiles of D and G
TABLE_9 = [
    (100e6, (10.29e9, 17.73e9), (8, 16)), (1e9, (53.74e9, 103.54e9), (16, 32)),
    (3e9, (106.22e9, 261.04e9), (16, 32)), (7e9, (177.65e9, 511.43e9), (16, 32)),
    (70e9, (721.60e9, 3.22e12), (32, 64)), (300e9, (1.73e12, 10.69e12), (32, 64)),
    (1e12, (3.60e12, 28.22e12), (32, 128)),
]


def test_expansion_rate_16_optima_lie_in_table_9_intervals():
    for active, (d_low, d_high), (g_low, g_high) in TABLE_9:
        optimum = budget_for_active_params(active, MOE_E16)
        assert d_low < optimum.tokens < d_high, active
        assert g_low <= optimum.granularity <= g_high, active


def test_moe_needs_about_20x_less_compute_than_dense_at_1e20():
    """Section 1: a compute-optimal MoE at 1e20 FLOPs matches a dense model with ~20x the compute."""
    best = compute_optimal(1e20, MOE_E64)
    needed = flops_to_match(best.loss, dense_compute_optimal, best.flops)
    assert dense_compute_optimal(needed).loss == pytest.approx(best.loss, abs=1e-9)
    assert 15 < needed / best.flops < 25
    standard = flops_to_match(best.loss, lambda f: optimal_for_granularity(f, 1, MOE_E64), best.flops)
    assert 1 < standard / best.flops < needed / best.flops


def test_optimal_granularity_grows_with_budget_and_beats_g1():
    optima = [compute_optimal(f, MOE_E64) for f in (1e18, 1e20, 1e22, 1e24, 1e26)]
    granularities = [o.granularity for o in optima]
    assert granularities == sorted(granularities) and granularities[0] > 1
    for optimum in optima:
        assert optimum.loss < optimal_for_granularity(optimum.flops, 1, MOE_E64).loss
        assert optimum.loss < dense_compute_optimal(optimum.flops).loss


def test_dense_optimum_spends_six_n_d():
    optimum = dense_compute_optimal(1e21)
    assert optimum.granularity == 1
    assert 6 * optimum.params * optimum.tokens == pytest.approx(1e21)


@pytest.mark.parametrize("flops", [0, -1e20, float("inf"), float("nan")])
def test_non_positive_or_non_finite_budget_is_rejected(flops):
    with pytest.raises(ScalingInputError, match="--flops"):
        compute_optimal(flops)


@pytest.mark.parametrize("granularities", [[1, 3], [0], [6, 8]])
def test_granularities_must_be_powers_of_two(granularities):
    with pytest.raises(ScalingInputError, match=r"--granularities.*power of two"):
        compute_optimal(1e20, granularities=granularities)


def test_impossible_constraints_are_named():
    with pytest.raises(ImpossibleConstraintsError, match="--max-tokens.*--max-params"):
        compute_optimal(1e20, max_params=1e9, max_tokens=1e9)
    with pytest.raises(ImpossibleConstraintsError, match="--granularities is empty"):
        compute_optimal(1e20, granularities=[])
    with pytest.raises(ImpossibleConstraintsError, match="one block"):
        compute_optimal(1e3)
    with pytest.raises(ScalingInputError, match="--max-params"):
        compute_optimal(1e20, max_params=-1)
