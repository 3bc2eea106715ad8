"""The ledger: Theorem 4 (loose) and RDP (tight) composition, checked like cryptography."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dpdedup.errors import PrivacyAccountingError, PrivacyBudgetError
from hf_dpdedup.privacy import (
    DEFAULT_ORDERS,
    AccountantStep,
    Charge,
    PrivacyMetadata,
    account,
    components,
    compose_loose,
    compose_tight,
    epsilon_from_rdp,
    opacus_epsilon,
    rdp_of_curve,
    rdp_of_history,
    rdp_of_pure_dp,
)

H1 = (AccountantStep(1.0, 0.01, 1000),)
H2 = (AccountantStep(0.8, 0.02, 300), AccountantStep(1.2, 0.05, 40))


def training(source: str, datasets, eps: float, delta: float = 1e-5, history=()) -> Charge:
    return Charge(source, datasets, eps, delta, "training", history)


# --- Theorem 4 on the paper's kind of examples ---------------------------------------------------
def test_base_plus_target_on_one_data_set_sums():
    assert compose_loose([training("base", "sst2", 1.0), training("target", "sst2", 2.0)]) == (3.0, 2e-5)


def test_intra_model_rule_counts_a_source_once():
    target = training("target", "sst2", 2.0)
    assert compose_loose([target, target, training("target", ("sst2",), 2.0)]) == (2.0, 1e-5)


def test_disjoint_data_sets_take_the_max():
    eps, delta = compose_loose([training("m1", "cifar", 0.5, 1e-6), training("m2", "celeba", 2.0, 1e-5)])
    assert (eps, delta) == (2.0, 1e-5)


def test_inter_data_rule_example_from_section_5_10():
    # base trained on CIFAR100 (ε 0.5) deduplicates a CelebA model (ε 0.8): max, not sum.
    report = account([training("cifar-base", "cifar100", 0.5), training("celeba-0.8", "celeba", 0.8)])
    assert report.epsilon_loose == 0.8
    assert sorted(c.epsilon_loose for c in report.components) == [0.5, 0.8]


def test_overlapping_data_sets_are_one_component():
    charges = [training("a", ("d1", "d2"), 1.0), training("b", "d2", 2.0), training("c", "d3", 2.5)]
    assert compose_loose(charges)[0] == 3.0


def test_chained_overlaps_are_transitive():
    # a–b share d2, b–c share d3: a and c share no data set but are in one component.
    charges = [training("a", ("d1", "d2"), 1.0), training("b", ("d2", "d3"), 2.0),
               training("c", ("d3", "d4"), 4.0), training("z", "other", 5.0)]
    assert compose_loose(charges)[0] == 7.0
    assert len(components(charges)) == 2


def test_declared_overlap_joins_components():
    charges = [training("t", "sst2-train", 2.0), Charge("svt#1", "sst2-val", 0.5, kind="svt")]
    assert compose_loose(charges)[0] == 2.0
    assert compose_loose(charges, overlaps=[("sst2-train", "sst2-val")])[0] == 2.5


def test_mechanism_charges_add_to_their_data_set():
    charges = [training("base", "sst2", 1.0), training("target", "sst2", 2.0),
               Charge("svt#1@sst2", "sst2", 0.5, kind="svt"), Charge("laplace#2@sst2", "sst2", 0.1, kind="laplace")]
    assert compose_loose(charges) == (3.6, 2e-5)


def test_non_private_source_makes_the_component_infinite():
    report = account([training("base", "sst2", 1.0), training("plain", "sst2", math.inf, 0.0), training("x", "y", 1.0)])
    assert report.epsilon_loose == math.inf
    assert report.epsilon_tight is None and "plain" in report.tight_unavailable


def test_a_public_source_costs_nothing_but_still_joins_its_component():
    charges = [Charge("public-base", ("sst2",), 0.0, 0.0), training("target", "sst2", 2.0, history=H1)]
    report = account(charges)
    assert (report.epsilon_loose, report.delta_loose) == (2.0, 1e-5)
    assert report.components[0].sources == ("public-base", "target")


def test_empty_ledger_costs_nothing():
    assert compose_loose([]) == (0.0, 0.0)
    assert compose_tight([]) == (0.0, 0.0)


def test_sum_is_rounded_up_never_down():
    eps, _ = compose_loose([training("a", "d", 0.1), training("b", "d", 0.2)])
    assert Fraction(eps) >= Fraction(0.1) + Fraction(0.2)  # the floats' exact real sum, not below


def test_conflicting_charges_under_one_id_are_refused():
    with pytest.raises(PrivacyAccountingError, match="share source_id"):
        account([training("m", "d", 1.0), training("m", "d", 2.0)])


@pytest.mark.parametrize(
    "kwargs",
    [dict(epsilon=-1.0), dict(epsilon=math.nan), dict(delta=1.0), dict(delta=-1e-9),
     dict(delta=math.nan), dict(datasets=()), dict(datasets=("",)), dict(source_id="")],
)
def test_invalid_charges_are_refused(kwargs):
    args = dict(source_id="m", datasets=("d",), epsilon=1.0, delta=1e-5) | kwargs
    with pytest.raises((PrivacyBudgetError, PrivacyAccountingError)):
        Charge(**args)


def test_invalid_target_delta_is_refused():
    with pytest.raises(PrivacyBudgetError, match="target_delta"):
        account([training("m", "d", 1.0, history=H1)], target_delta=0.0)


# --- tight (RDP) accounting -------------------------------------------------------------------------
def test_rdp_of_two_histories_equals_opacus_on_the_concatenated_history():
    e1, e2 = opacus_epsilon(H1, delta=1e-5), opacus_epsilon(H2, delta=1e-5)
    report = account([training("base", "sst2", e1, 1e-5, H1), training("target", "sst2", e2, 1e-5, H2)])
    (component,) = report.components
    assert component.delta_tight == 2e-5
    assert component.epsilon_rdp == opacus_epsilon(H1 + H2, delta=2e-5)
    assert report.epsilon_tight == min(component.epsilon_rdp, e1 + e2)
    assert report.epsilon_tight < report.epsilon_loose


def test_rdp_at_a_target_delta_equals_opacus():
    report = account([training("a", "d", 9.0, 1e-5, H1), training("b", "d", 9.0, 1e-5, H2)], target_delta=1e-6)
    assert report.epsilon_tight == opacus_epsilon(H1 + H2, delta=1e-6)
    assert report.delta_tight == 1e-6


def test_default_orders_are_opacus_defaults():
    from opacus.accountants import RDPAccountant

    assert DEFAULT_ORDERS == tuple(float(a) for a in RDPAccountant.DEFAULT_ALPHAS)


def test_tight_figure_needs_a_curve_for_every_charge():
    report = account([training("a", "d", 1.0, 1e-5, H1), training("b", "d", 2.0, 1e-5)])
    assert report.epsilon_tight is None and report.delta_tight is None
    assert "b" in report.tight_unavailable
    assert (report.epsilon, report.delta) == (report.epsilon_loose, report.delta_loose)
    assert compose_tight([training("b", "d", 2.0, 1e-5)]) is None


def test_pure_dp_only_component_without_delta_is_the_sum():
    charges = [Charge("svt#1", "val", 0.5, kind="svt"), Charge("svt#2", "val", 0.25, kind="svt")]
    assert compose_tight(charges) == (0.75, 0.0)


def test_many_pure_dp_charges_compose_below_the_sum_at_positive_delta():
    charges = [Charge(f"q{i}", "val", 0.05, kind="naive_laplace") for i in range(400)]
    eps, delta = compose_tight(charges, target_delta=1e-6)
    assert eps < 20.0 and delta == 1e-6  # advanced-composition-like gain over the sum of 20


def test_pure_dp_rdp_bound_is_the_documented_one():
    eps = 0.7
    curve = rdp_of_pure_dp(eps)
    alphas = np.asarray(DEFAULT_ORDERS)
    np.testing.assert_allclose(curve, np.minimum(eps, alphas * eps**2 / 2), rtol=1e-15)
    assert np.all(curve <= eps)


def test_known_rdp_curve_is_bounded_from_above_by_monotonicity():
    curve = rdp_of_curve([(2.0, 0.1), (8.0, 0.5)], orders=(1.5, 2.0, 3.0, 8.0, 9.0))
    assert list(curve) == [0.1, 0.1, 0.5, 0.5, math.inf]


def test_charge_with_known_rdp_curve_is_tight_able():
    orders_and_values = [(a, a * 0.01) for a in DEFAULT_ORDERS]
    report = account([Charge("gauss", "d", 5.0, 1e-5, kind="other", rdp=orders_and_values)])
    expected = epsilon_from_rdp(np.asarray([v for _, v in orders_and_values]), delta=1e-5)
    assert report.components[0].epsilon_rdp == expected


def test_history_and_pure_curve_take_the_elementwise_min():
    charge = Charge("odd", "d", 0.3, 0.0, history=H1)
    assert np.array_equal(charge.rdp_curve(), np.minimum(rdp_of_history(H1), rdp_of_pure_dp(0.3)))


def test_a_target_delta_below_the_loose_delta_reports_the_rdp_figure_as_is():
    # Loose (Σε, 2e-5) is no guarantee at δ = 1e-7, so no min with it.
    report = account([training("a", "d", 0.5, 1e-5, H1), training("b", "d", 0.5, 1e-5, H2)], target_delta=1e-7)
    assert report.epsilon_tight == report.components[0].epsilon_rdp > report.epsilon_loose


# --- serialisation ---------------------------------------------------------------------------------
def test_charge_round_trips_through_json():
    charge = Charge("t", ("b", "a"), math.inf, 0.0, "training", H2, rdp=((2.0, 0.1),), seeded=True)
    assert Charge.from_dict(json.loads(json.dumps(charge.to_dict()))) == charge
    assert charge.datasets == ("a", "b")


def test_charge_from_metadata():
    meta = PrivacyMetadata(1.5, 1e-5, ("sst2",), "rdp", H1)
    assert Charge.from_metadata("m1", meta) == Charge("m1", "sst2", 1.5, 1e-5, "training", H1)


def test_report_to_dict_is_json_and_states_both_figures():
    report = account([training("base", "sst2", 1.0, 1e-5, H1), training("t", "sst2", 2.0, 1e-5, H2)])
    data = json.loads(json.dumps(report.to_dict()))
    assert data["basis"] == "tight" and data["loose"] == {"epsilon": 3.0, "delta": 2e-5}
    assert data["tight"]["epsilon"] <= 3.0 and data["noise"] == "secure"
    meta = report.to_metadata()
    assert (meta.epsilon, meta.delta, meta.datasets) == (report.epsilon, report.delta, ("sst2",))


def test_seeded_charges_mark_the_report():
    report = account([Charge("svt#1", "val", 1.0, kind="svt", seeded=True)])
    assert report.seeded and report.to_dict()["noise"].startswith("TEST ONLY")


# --- properties --------------------------------------------------------------------------------------
DATASETS = st.lists(st.sampled_from(["d1", "d2", "d3", "d4", "d5"]), min_size=1, max_size=2)
HISTORIES = st.lists(
    st.builds(AccountantStep, st.sampled_from([0.6, 1.0, 2.0]), st.sampled_from([0.01, 0.1]),
              st.integers(min_value=1, max_value=2000)),
    min_size=1, max_size=2,
).map(tuple)


@st.composite
def charge_lists(draw, min_size=0):
    n = draw(st.integers(min_value=min_size, max_value=6))
    out = []
    for i in range(n):
        datasets = tuple(draw(DATASETS))
        eps = draw(st.floats(min_value=0.01, max_value=10.0))
        if draw(st.booleans()):
            out.append(Charge(f"c{i}", datasets, eps, 0.0, "svt"))  # pure DP
        else:
            delta = draw(st.sampled_from([1e-6, 1e-5]))
            history = draw(HISTORIES) if draw(st.integers(0, 4)) else ()
            out.append(Charge(f"c{i}", datasets, eps, delta, "training", history))
    return out


@settings(max_examples=60, deadline=None, derandomize=True)
@given(charge_lists(), charge_lists(min_size=1))
def test_adding_sources_never_lowers_the_loose_figure(base, extra):
    extra = [Charge("x" + c.source_id, c.datasets, c.epsilon, c.delta, c.kind, c.history) for c in extra]
    before, after = compose_loose(base), compose_loose(base + extra)
    assert after[0] >= before[0] and after[1] >= before[1]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(charge_lists(), charge_lists(min_size=1))
def test_adding_sources_never_lowers_the_tight_figure_at_a_fixed_delta(base, extra):
    extra = [Charge("x" + c.source_id, c.datasets, c.epsilon, c.delta, c.kind, c.history) for c in extra]
    before, after = compose_tight(base, target_delta=1e-5), compose_tight(base + extra, target_delta=1e-5)
    if before is not None and after is not None:
        assert after[0] >= before[0] - 1e-12


@settings(max_examples=60, deadline=None, derandomize=True)
@given(charge_lists())
def test_tight_never_exceeds_loose_and_is_never_negative(charges):
    report = account(charges)
    for component in report.components:
        if component.epsilon_tight is not None:
            assert 0.0 <= component.epsilon_tight <= component.epsilon_loose
            assert component.delta_tight == component.delta_loose
    if report.epsilon_tight is not None:
        assert report.epsilon_tight <= report.epsilon_loose
    assert report.epsilon <= report.epsilon_loose


@settings(max_examples=60, deadline=None, derandomize=True)
@given(charge_lists().flatmap(lambda cs: st.tuples(st.just(cs), st.permutations(cs))))
def test_figures_do_not_depend_on_charge_order(pair):
    charges, shuffled = pair
    assert compose_loose(charges) == compose_loose(shuffled)
    assert compose_tight(charges) == compose_tight(shuffled)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(charge_lists(min_size=1))
def test_loose_figure_is_the_brute_force_max_of_component_sums(charges):
    # Independent re-derivation: components by repeated merging, then max of sums.
    groups = [({*c.datasets}, [c]) for c in charges]
    merged = True
    while merged:
        merged = False
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                if groups[i][0] & groups[j][0]:
                    groups[i] = (groups[i][0] | groups[j][0], groups[i][1] + groups[j][1])
                    del groups[j]
                    merged = True
                    break
            if merged:
                break
    exact = max(sum((Fraction(c.epsilon) for c in g), Fraction(0)) for _, g in groups)
    eps = compose_loose(charges)[0]
    assert Fraction(eps) >= exact  # never below the real sum ...
    assert eps == pytest.approx(float(exact), rel=1e-15)  # ... and only rounded up
