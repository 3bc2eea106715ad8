"""Sparse Vector Technique, Laplace release and the naive baseline: formulas, halting, noise scales."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dpdedup.errors import PrivacyBudgetError, SVTHaltedError
from hf_dpdedup.privacy import (
    SCORE_GRID,
    LaplaceSampler,
    NaiveLaplaceValidator,
    PrivateDataset,
    SVTSession,
    account,
    discrete_laplace_variance,
    naive_epsilon,
    release_utility,
    split_budget,
    svt_parameters,
)

N = 1000


def accuracy(model, batch):
    """Per-example score: the toy 'model' is a set of example ids it gets right."""
    return [1.0 if x in model else 0.0 for x in batch]


def model_with_accuracy(acc: float, n: int = N) -> set[int]:
    return set(range(round(acc * n)))


class RecordingSampler(LaplaceSampler):
    """Seeded sampler that records every (scale, draw)."""

    def __init__(self, seed: int = 0) -> None:
        base = LaplaceSampler.seeded_for_tests(seed)
        super().__init__(base._rng, seeded=True)
        self.draws: list[tuple[Fraction, int]] = []

    def discrete_laplace(self, scale):
        z = super().discrete_laplace(scale)
        self.draws.append((Fraction(scale), z))
        return z


def open_session(ds, reference, *, epsilon=1.0, cutoff=3, allowed_drop=0.02, sampler=None, **kw):
    return SVTSession(ds, reference=reference, score_fn=accuracy, epsilon=epsilon, cutoff=cutoff,
                      allowed_drop=allowed_drop, sampler=sampler or LaplaceSampler.seeded_for_tests(0), **kw)


# --- formulas -----------------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.floats(min_value=1e-3, max_value=100.0), st.integers(min_value=1, max_value=1000))
def test_budget_split_has_the_recommended_ratio_and_never_overspends(epsilon, cutoff):
    eps1, eps2 = split_budget(epsilon, cutoff)
    assert eps1 > 0 and eps2 > 0
    assert Fraction(eps1) + Fraction(eps2) <= Fraction(epsilon)  # exactly, not up to rounding
    assert eps2 / eps1 == pytest.approx((2 * cutoff) ** (2 / 3), rel=1e-9)


def test_parameters_follow_design_formulas():
    p = svt_parameters(epsilon=1.0, cutoff=3, size=N)
    delta = 2 / N
    assert p.sensitivity == delta
    assert p.epsilon_threshold == pytest.approx(1 / (1 + 6 ** (2 / 3)))
    assert p.threshold_scale == pytest.approx(delta / p.epsilon_threshold, rel=1e-12)
    assert p.query_scale == pytest.approx(2 * 3 * delta / p.epsilon_queries, rel=1e-12)
    # in grid units the scales are exact rationals
    assert p.threshold_scale_units == Fraction(2 * SCORE_GRID) / Fraction(p.epsilon_threshold)


@pytest.mark.parametrize(
    "kwargs", [dict(epsilon=0.0), dict(epsilon=-1.0), dict(epsilon=math.nan), dict(epsilon=math.inf),
               dict(cutoff=0), dict(cutoff=1.5), dict(allowed_drop=-0.1), dict(allowed_drop=2.0), dict(floor=1.5)],
)
def test_invalid_session_parameters_are_refused_before_any_charge(kwargs):
    ds = PrivateDataset(list(range(N)), dataset_id="val", public_size=N)
    with pytest.raises(PrivacyBudgetError):
        open_session(ds, model_with_accuracy(0.9), **kwargs)
    assert ds.charges == () and ds.charged_reads == 0


# --- the mechanism ---------------------------------------------------------------------------------------
def test_threshold_noise_is_drawn_once_and_each_query_gets_its_own():
    ds = PrivateDataset(list(range(N)), dataset_id="val", public_size=N)
    sampler = RecordingSampler()
    session = open_session(ds, model_with_accuracy(0.9), cutoff=100, sampler=sampler)
    assert [s for s, _ in sampler.draws] == [session.parameters.threshold_scale_units]
    for _ in range(5):
        session.accepts(model_with_accuracy(0.9))
    scales = [s for s, _ in sampler.draws]
    assert scales[1:] == [session.parameters.query_scale_units] * 5 and len(scales) == 6


def test_noise_scales_in_use_match_the_formulas_statistically():
    """Many sessions (ρ) and many queries (ν) with fixed seeds: sample variances vs 2b² (discrete)."""
    ds = PrivateDataset(list(range(50)), dataset_id="val", public_size=50, batch_size=50)
    sampler = RecordingSampler(seed=11)
    reference = model_with_accuracy(0.5, 50)
    for _ in range(1500):
        open_session(ds, reference, epsilon=2.0, cutoff=2, allowed_drop=1.0, sampler=sampler).close()
    session = open_session(ds, reference, epsilon=2.0, cutoff=2, allowed_drop=1.0, sampler=sampler)
    for _ in range(1500):
        assert session.accepts(reference) or not session.halted
    p = session.parameters
    units = 50 * SCORE_GRID
    rho = [z / units for s, z in sampler.draws if s == p.threshold_scale_units]
    nu = [z / units for s, z in sampler.draws if s == p.query_scale_units]
    assert len(rho) == 1501 and len(nu) >= 1500 - 2
    for draws, scale in ((rho, p.threshold_scale), (nu, p.query_scale)):
        mean = sum(draws) / len(draws)
        var = sum((x - mean) ** 2 for x in draws) / (len(draws) - 1)
        assert var == pytest.approx(2 * scale**2, rel=0.15)  # ≈ 4 sd of the sample variance
        assert var == pytest.approx(discrete_laplace_variance(scale * units) / units**2, rel=0.15)


def test_halts_after_exactly_c_too_big_a_drop_answers():
    ds = PrivateDataset(list(range(N)), dataset_id="val", public_size=N)
    session = open_session(ds, model_with_accuracy(0.9), epsilon=1e4, cutoff=3)  # near noiseless
    good, bad = model_with_accuracy(0.895), model_with_accuracy(0.5)
    answers = [session.accepts(m) for m in (good, bad, good, good, bad, good, bad)]
    assert answers == [True, False, True, True, False, True, False]
    assert session.halted and session.above_count == 3 and session.queries == 7
    with pytest.raises(SVTHaltedError, match="cut-off 3"):
        session.accepts(good)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(min_value=1, max_value=5), st.lists(st.booleans(), min_size=1, max_size=25), st.integers(0, 2**32))
def test_above_count_never_exceeds_c_and_halting_matches_it(cutoff, pattern, seed):
    ds = PrivateDataset(list(range(100)), dataset_id="val", public_size=100, batch_size=100)
    reference = model_with_accuracy(0.9, 100)
    session = open_session(ds, reference, epsilon=1.0, cutoff=cutoff, allowed_drop=0.05,
                           sampler=LaplaceSampler.seeded_for_tests(seed))
    falses = 0
    for is_bad in pattern:
        if session.halted:
            break
        falses += not session.accepts(model_with_accuracy(0.2 if is_bad else 0.9, 100))
    assert session.above_count == falses <= cutoff
    assert session.halted == (falses == cutoff)


def test_session_is_charged_once_however_many_queries():
    ds = PrivateDataset(list(range(N)), dataset_id="val", public_size=N)
    session = open_session(ds, model_with_accuracy(0.9), epsilon=0.5, cutoff=100)
    for _ in range(40):
        session.accepts(model_with_accuracy(0.9))
    assert ds.charges == (session.charge,) and session.epsilon_spent == 0.5 == ds.epsilon_spent
    assert session.charge.kind == "svt" and session.charge.delta == 0.0
    assert ds.charged_reads == 41 and ds.raw_accesses == 0


def test_reference_is_read_when_the_session_opens():
    ds = PrivateDataset(list(range(N)), dataset_id="val", public_size=N)
    model = model_with_accuracy(0.9)
    session = open_session(ds, model, epsilon=1e4)
    model.difference_update(range(850))  # the engine edits the live model in place
    assert session.accepts(model) is False  # judged against the original 0.9, not the edited model


def test_floor_rejects_a_small_drop_below_the_floor():
    ds = PrivateDataset(list(range(N)), dataset_id="val", public_size=N)
    session = open_session(ds, model_with_accuracy(0.9), epsilon=1e4, allowed_drop=0.05, floor=0.88)
    assert session.accepts(model_with_accuracy(0.89)) is True
    assert session.accepts(model_with_accuracy(0.87)) is False  # drop 0.03 ≤ 0.05, but below the floor


def test_session_report_is_public_facts_and_marks_seeded_noise():
    ds = PrivateDataset(list(range(N)), dataset_id="val", public_size=N)
    info = open_session(ds, model_with_accuracy(0.9)).to_dict()
    assert info["noise"].startswith("TEST ONLY") and info["sensitivity"] == 2 / N
    assert not any("utility" in k or "accuracy" in k for k in info)
    assert open_session(ds, model_with_accuracy(0.9), sampler=LaplaceSampler.secure()).to_dict()["noise"] == "secure"


# --- Laplace release and the naive baseline --------------------------------------------------------------
def test_release_is_charged_and_its_noise_has_the_formula_scale():
    ds = PrivateDataset(list(range(N)), dataset_id="val", public_size=N)
    sampler = LaplaceSampler.seeded_for_tests(5)
    values = [release_utility(ds, model_with_accuracy(0.5), score_fn=accuracy, epsilon=2.0, sampler=sampler).value
              for _ in range(1200)]
    scale = 1 / (N * 2.0)
    var = sum((v - 0.5) ** 2 for v in values) / len(values)
    assert var == pytest.approx(2 * scale**2, rel=0.15)
    assert len(ds.charges) == 1200 and {c.kind for c in ds.charges} == {"laplace"}
    assert ds.epsilon_spent == 2400.0


def test_release_with_a_large_epsilon_is_close_and_clamped():
    ds = PrivateDataset(list(range(N)), dataset_id="val", public_size=N)
    release = release_utility(ds, model_with_accuracy(1.0), score_fn=accuracy, epsilon=1e6,
                              sampler=LaplaceSampler.seeded_for_tests(0))
    assert 0.999 <= release.value <= 1.0 and release.seeded and release.to_dict()["epsilon"] == 1e6


def test_naive_baseline_charges_every_query():
    ds = PrivateDataset(list(range(N)), dataset_id="val", public_size=N)
    validator = NaiveLaplaceValidator(ds, reference=model_with_accuracy(0.9), score_fn=accuracy,
                                      epsilon_per_query=0.1, allowed_drop=0.02,
                                      sampler=LaplaceSampler.seeded_for_tests(0))
    for _ in range(30):
        validator.accepts(model_with_accuracy(0.9))
    assert validator.queries == 30 and len(validator.charges) == 30 == len(ds.charges)
    assert validator.epsilon_spent == pytest.approx(3.0) and naive_epsilon(30, 0.1) >= 3.0
    assert account(ds.charges).epsilon_loose == validator.epsilon_spent


def test_naive_baseline_stops_at_the_data_set_budget():
    ds = PrivateDataset(list(range(N)), dataset_id="val", public_size=N, epsilon_budget=0.35)
    validator = NaiveLaplaceValidator(ds, reference=model_with_accuracy(0.9), score_fn=accuracy,
                                      epsilon_per_query=0.1, allowed_drop=0.02)
    for _ in range(3):
        validator.accepts(model_with_accuracy(0.9))
    with pytest.raises(PrivacyBudgetError, match="budget"):
        validator.accepts(model_with_accuracy(0.9))
    assert ds.epsilon_spent <= 0.35


def test_svt_cost_is_flat_while_naive_cost_grows_with_validations():
    # Tables 14–15: ~150 validations for 19 models. SVT: ε per model regardless of count.
    ds_svt = PrivateDataset(list(range(N)), dataset_id="val", public_size=N)
    session = open_session(ds_svt, model_with_accuracy(0.9), epsilon=1.0, cutoff=10**6)
    for _ in range(150):
        session.accepts(model_with_accuracy(0.9))
    assert account(ds_svt.charges).epsilon_loose == 1.0
    assert naive_epsilon(150, 1.0) == 150.0
