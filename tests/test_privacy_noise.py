"""Exact discrete Laplace sampler: distribution, variance, secure and seeded modes (fixed seeds)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from hf_dpdedup.errors import PrivacyBudgetError
from hf_dpdedup.privacy import SEEDED_LABEL, LaplaceSampler, discrete_laplace_variance


def pmf(z: int, scale: float) -> float:
    p = math.exp(-1.0 / scale)
    return (1 - p) / (1 + p) * p ** abs(z)


def sample_stats(scale, n: int, seed: int) -> tuple[float, float]:
    sampler = LaplaceSampler.seeded_for_tests(seed)
    xs = [sampler.discrete_laplace(scale) for _ in range(n)]
    mean = sum(xs) / n
    return mean, sum((x - mean) ** 2 for x in xs) / (n - 1)


@pytest.mark.parametrize("scale", [0.7, 4.0, 2 * 65536 / 0.3, Fraction(3 * 65536) / Fraction(0.123456789)])
def test_sample_variance_matches_the_formula(scale):
    n = 12_000
    mean, var = sample_stats(scale, n, seed=1)
    expected = discrete_laplace_variance(scale)
    # sd of the sample variance of a Laplace law ≈ sqrt(5/n)·σ² ≈ 2 % here: allow 4 sd.
    assert var == pytest.approx(expected, rel=0.08)
    assert abs(mean) < 4 * math.sqrt(expected / n)


def test_small_scale_probabilities_match_the_exact_pmf():
    n, scale = 20_000, 1.0
    sampler = LaplaceSampler.seeded_for_tests(2)
    counts: dict[int, int] = {}
    for _ in range(n):
        z = sampler.discrete_laplace(scale)
        counts[z] = counts.get(z, 0) + 1
    for z in range(-3, 4):
        p = pmf(z, scale)
        assert counts.get(z, 0) / n == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))


def test_variance_formula_equals_the_pmf_sum():
    for scale in (0.5, 3.0):
        direct = sum(z * z * pmf(z, scale) for z in range(-400, 401))
        assert discrete_laplace_variance(scale) == pytest.approx(direct, rel=1e-9)
    assert discrete_laplace_variance(1000.0) == pytest.approx(2 * 1000.0**2, rel=1e-3)


def test_bernoulli_exp_has_probability_exp_minus_gamma():
    sampler = LaplaceSampler.seeded_for_tests(3)
    n = 20_000
    for gamma in (Fraction(1, 3), Fraction(1)):
        freq = sum(sampler._bernoulli_exp(gamma) for _ in range(n)) / n
        p = math.exp(-float(gamma))
        assert freq == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))


def test_seeded_mode_is_reproducible_and_labelled():
    a, b = LaplaceSampler.seeded_for_tests(42), LaplaceSampler.seeded_for_tests(42)
    assert [a.discrete_laplace(10) for _ in range(50)] == [b.discrete_laplace(10) for _ in range(50)]
    assert a.seeded and SEEDED_LABEL in repr(a)


def test_secure_mode_is_the_default_and_not_seeded():
    sampler = LaplaceSampler.secure()
    assert not sampler.seeded and "secure" in repr(sampler)
    assert type(sampler._rng).__name__ == "SystemRandom"
    draws = {sampler.discrete_laplace(1000) for _ in range(20)}
    assert len(draws) > 1


@pytest.mark.parametrize("scale", [0, -1.0, math.inf, math.nan])
def test_invalid_scales_are_refused(scale):
    with pytest.raises(PrivacyBudgetError):
        LaplaceSampler.seeded_for_tests(0).discrete_laplace(scale)
