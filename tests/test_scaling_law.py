"""The fitted law and the paper's FLOPs model against hand computation and the paper's own tables."""

import math

import pytest

from granular_moe.config import GranularMoEConfigError
from granular_moe.scaling import DENSE, MOE_E16, MOE_E64, PaperArchitecture, ScalingInputError, moe_law
from granular_moe.scaling.law import outside_fitted_range


def test_moe_law_at_known_points():
    # N = 1e9, D = 1e10, G = 1: N**0.115 = 10**1.035 = 10.839, D**0.147 = 10**1.47 = 29.512, g / 1**gamma = 2.1
    # 0.472 + 20.2 / 10.839 + 30.8 / 29.512 = 0.472 + 1.86364 + 1.04364
    assert MOE_E64.loss(1e9, 1e10, 1) == pytest.approx(0.472 + (2.1 + 18.1) / 10**1.035 + 30.8 / 10**1.47, rel=1e-12)
    assert MOE_E64.loss(1e9, 1e10, 1) == pytest.approx(3.3793, abs=1e-4)
    # N = 1e12, D = 1e11, G = 8: 8**0.58 = 2**1.74 = 3.3404, 10**1.38 = 23.988, 10**1.617 = 41.400
    # 0.472 + (0.62866 + 18.1) / 23.988 + 30.8 / 41.400 = 0.472 + 0.78075 + 0.74396
    expected = 0.472 + (2.1 / 2**1.74 + 18.1) / 10**(12 * 0.115) + 30.8 / 10**(11 * 0.147)
    assert MOE_E64.loss(1e12, 1e11, 8) == pytest.approx(expected, rel=1e-12)
    assert MOE_E64.loss(1e12, 1e11, 8) == pytest.approx(1.99671, abs=1e-5)


def test_dense_law_is_chinchilla_form_of_table_1():
    assert DENSE.loss(1e9, 1e10) == pytest.approx(0.472 + 16.3 / 10**(9 * 0.126) + 26.7 / 10**(10 * 0.127))
    assert DENSE.is_dense and not MOE_E64.is_dense


def test_appendix_d_law_for_expansion_rate_16():
    expected = 0.472 + (1.18 / 4**0.986 + 19.64) / 10**(9 * 0.124) + 57.07 / 10**(10 * 0.169)
    assert MOE_E16.loss(1e9, 1e10, 4) == pytest.approx(expected)
    assert moe_law(16) is MOE_E16 and moe_law(64) is MOE_E64


def test_loss_falls_with_granularity_size_and_tokens_towards_c():
    losses = [MOE_E64.loss(1e9, 1e10, g) for g in (1, 2, 4, 8, 64)]
    assert losses == sorted(losses, reverse=True) and len(set(losses)) == 5
    assert MOE_E64.loss(1e10, 1e10) < MOE_E64.loss(1e9, 1e10)
    assert MOE_E64.loss(1e9, 1e11) < MOE_E64.loss(1e9, 1e10)
    assert MOE_E64.loss(1e40, 1e40, 1) == pytest.approx(MOE_E64.c, abs=1e-3)
    # granularity's gain is bounded by g / N**alpha (the paper's "a" keeps it above the dense limit)
    assert MOE_E64.loss(1e9, 1e10, 1) - MOE_E64.loss(1e9, 1e10, 1e9) < 2.1 / 1e9**0.115 + 1e-9


@pytest.mark.parametrize("params, tokens, granularity, word", [
    (0, 1e10, 1, "model size"), (1e9, -5, 1, "training tokens"), (1e9, float("nan"), 1, "training tokens"),
    (1e9, 1e10, 0.5, "granularity"), (1e9, 1e10, 0, "granularity"),
])
def test_law_rejects_bad_arguments(params, tokens, granularity, word):
    with pytest.raises(ScalingInputError, match=word):
        MOE_E64.loss(params, tokens, granularity)


def test_unfitted_expansion_rate_names_the_valid_ones():
    with pytest.raises(GranularMoEConfigError, match=r"--expansion-rate.*valid values: 16, 64"):
        moe_law(8)


def test_fitted_range_notes():
    assert outside_fitted_range(1e9, 5e10) == []
    notes = outside_fitted_range(1e12, 1e9)
    assert len(notes) == 2 and "parameters" in notes[0] and "tokens" in notes[1]


@pytest.mark.parametrize("n_blocks, d_model, label", [(4, 256, 3e6), (8, 512, 25e6), (10, 640, 49e6), (12, 768, 85e6)])
def test_paper_architecture_matches_table_3_models(n_blocks, d_model, label):
    # Appendix A, Table 3: the "64 x N_act" models whose d_model is 64 n_blocks; N_act = 12 d_model^2 n_blocks
    arch = PaperArchitecture(n_blocks, 64)
    assert arch.d_model == d_model
    assert arch.active_params == 12 * d_model**2 * n_blocks
    assert arch.active_params == pytest.approx(label, rel=0.06)
    assert arch.params == d_model**2 * (8 * 64 + 4) * n_blocks  # Section 6.1
    assert PaperArchitecture.from_active_params(arch.active_params, 64).n_blocks == pytest.approx(n_blocks)


def test_eq_10_flops_by_hand():
    arch = PaperArchitecture(8, 64)  # d_model 512
    per_token = arch.flops_per_token(granularity=4)
    assert per_token.attention == 4 * 512**2 * 6 * 8
    assert per_token.feed_forward == 8 * 512**2 * 6 * 8
    assert per_token.routing == 512 * 64 * 4 * 14 * 8
    assert per_token.total == (12 * 512**2 * 6 + 512 * 64 * 4 * 14) * 8 == 165_675_008
    assert arch.training_flops(1e9, 4) == pytest.approx(165_675_008e9)
    assert arch.tokens_for_flops(165_675_008e9, 4) == pytest.approx(1e9)
    # routing grows linearly with G; the dense model has none and costs 6 N D
    assert arch.flops_per_token(64).routing == 16 * per_token.routing
    dense = PaperArchitecture(8, None)
    assert dense.flops_per_token(4).routing == 0
    assert dense.training_flops(1e9) == pytest.approx(6 * dense.params * 1e9)


# Table 2 of the paper: N (as E x N_act), D, G, FLOPs
TABLE_2 = [(100e6, 4.37e9, 8, 2.95e18), (1e9, 28.94e9, 16, 1.93e20), (3e9, 72.90e9, 16, 1.41e21),
           (7e9, 137.60e9, 32, 6.46e21), (70e9, 941.07e9, 32, 4.16e23), (300e9, 2.96e12, 64, 5.69e24),
           (1e12, 7.94e12, 64, 4.97e25)]


@pytest.mark.parametrize("active, tokens, granularity, flops", TABLE_2)
def test_eq_10_reproduces_table_2_flops_column(active, tokens, granularity, flops):
    arch = PaperArchitecture.from_active_params(active, 64)
    assert math.isclose(arch.training_flops(tokens, granularity), flops, rel_tol=5e-3)
