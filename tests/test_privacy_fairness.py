"""The fairness verdict, and every other decision, charged to each member whose output it read.

Randomized-response family (issue 13, critical 1): the private training set holds one bit ``b``;
member ``i`` releases ``RR_εi(b)`` (``b`` with probability e^εi / (1 + e^εi), ε_i-DP) and its public
utility *is* that released bit. All the randomness of a dedup run with public validation is then in
the members' bits, so the distribution of everything a target's report shows (stored or not, its
fairness verdict, its utilities, its claimed ε) is computed *exactly* for b = 0 and b = 1 by running
the engine on all 2^3 bit patterns — a statistical test whose "seeds" are the whole sample space,
so it has no sampling error and no tolerance but floating-point rounding. It must hold that

* the claimed ε of the target is the same for every pattern (it may not depend on the data), and
* for every outcome o, P(o | b=0) ≤ e^ε · P(o | b=1) and vice versa (the likelihood ratio of the
  neighbouring data sets is at most e^ε).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dpdedup.dedup.plan import PlanConfig
from hf_dpdedup.dedup.planner import DedupConfig, DedupData, Member, dedup_group, fairness_verdicts
from hf_dpdedup.privacy import PrivacyMetadata

EPSILONS = {"a": 0.5, "b": 1.0, "t": 1.5}  # a: the base, b: a lower-ε sibling, t: the target
BLOCK = 16
NO_DATA_PLAN = PlanConfig(cost="delta")  # the toy members have no loss to take gradients of


class BitModel(torch.nn.Module):
    """A "model" whose every weight is its released bit; its utility on any data is that bit."""

    def __init__(self, bit: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((BLOCK,), float(bit)))


def bit_score(model, batch):
    return model.weight[0].detach().clamp(0, 1).expand(len(batch))


def keep_probability(epsilon: float) -> float:
    return math.exp(epsilon) / (1 + math.exp(epsilon))


def target_outcome(bits: dict[str, int], config: DedupConfig):
    members = [Member(name, BitModel(bits[name]), PrivacyMetadata(eps, 0.0, ("rr-train",)))
               for name, eps in EPSILONS.items()]
    data = DedupData(bit_score, public_val=[[0] * 4], public_test=[[0] * 4])
    outcome = next(o for o in dedup_group(members, data, config) if o.member.name == "t")
    report = outcome.report
    shown = (outcome.stored, report.role, repr(getattr(report, "fairness", None)), report.test_utility_before,
             report.test_utility_after, report.val_utility_after)
    return shown, report.epsilon_after


def outcome_distributions(config: DedupConfig):
    """{b: {outcome: probability}} and the set of claimed ε, over all bit patterns."""
    dist = {0: defaultdict(float), 1: defaultdict(float)}
    claimed = set()
    for pattern in itertools.product((0, 1), repeat=len(EPSILONS)):
        bits = dict(zip(EPSILONS, pattern))
        shown, epsilon = target_outcome(bits, config)
        claimed.add(epsilon)
        for b in (0, 1):
            p = 1.0
            for name, eps in EPSILONS.items():
                p *= keep_probability(eps) if bits[name] == b else 1 - keep_probability(eps)
            dist[b][shown] += p
    return dist, claimed


def worst_log_ratio(dist) -> float:
    worst = 0.0
    for o in set(dist[0]) | set(dist[1]):
        p0, p1 = dist[0].get(o, 0.0), dist[1].get(o, 0.0)
        if p0 == 0 or p1 == 0:
            return math.inf
        worst = max(worst, abs(math.log(p0 / p1)))
    return worst


@pytest.mark.parametrize("interactive", [False, True])
@pytest.mark.parametrize("fairness", ["flag", "drop"])
def test_randomized_response_family_claimed_epsilon_bounds_the_likelihood_ratio(interactive, fairness):
    config = DedupConfig(block_size=BLOCK, threshold=0.0, interactive=interactive, plan=NO_DATA_PLAN, fairness=fairness)
    dist, claimed = outcome_distributions(config)
    assert worst_log_ratio(dist) <= max(claimed) * (1 + 1e-9), (worst_log_ratio(dist), sorted(claimed))
    assert len(claimed) == 1, f"the claimed ε depends on the data: {sorted(claimed)}"
    (epsilon,) = claimed
    # the verdict read both lower-ε members: it is charged both, whatever it says
    assert epsilon == pytest.approx(sum(EPSILONS.values()))


def test_without_a_verdict_a_non_interactive_target_pays_only_what_its_search_read():
    config = DedupConfig(block_size=BLOCK, threshold=0.0, interactive=False, plan=NO_DATA_PLAN, fairness="off")
    dist, claimed = outcome_distributions(config)
    assert claimed == {EPSILONS["t"] + EPSILONS["a"]}
    assert worst_log_ratio(dist) <= EPSILONS["t"] + EPSILONS["a"] + 1e-9


def test_declared_overlaps_join_the_validation_set_with_the_training_set():
    """DedupConfig.overlaps reaches the ledger: a validation set that shares people with the training set
    is composed sequentially with it (sum), not in parallel (max)."""
    from hf_dpdedup.privacy import PrivateDataset

    def run(overlaps):
        members = [Member(name, BitModel(1), PrivacyMetadata(eps, 0.0, ("rr-train",)))
                   for name, eps in EPSILONS.items()]
        private = PrivateDataset([0] * 50, dataset_id="rr-val", public_size=50)
        data = DedupData(bit_score, public_val=[[0] * 4], private_val=private)
        config = DedupConfig(block_size=BLOCK, threshold=0.5, interactive=False, plan=NO_DATA_PLAN, fairness="off", validation="svt",
                             svt_epsilon=4.0, overlaps=overlaps)
        return next(o for o in dedup_group(members, data, config) if o.member.name == "t").report.ledger

    apart, joined = run(()), run((("rr-train", "rr-val"),))
    assert apart.epsilon_loose == pytest.approx(4.0)  # max(1.5 + 0.5, 4): disjoint data, parallel composition
    assert joined.epsilon_loose == pytest.approx(1.5 + 0.5 + 4.0)
    assert len(joined.components) == 1 and set(joined.datasets) == {"rr-train", "rr-val"}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.5, 1.0, 2.0, 4.0]), st.floats(0, 1), st.floats(0, 1)),
                min_size=1, max_size=6))
def test_what_a_verdict_reads_depends_on_the_budgets_only(rows):
    """Property: for any two utility assignments, the members a verdict compared with (and is charged)
    are the same; it flags exactly the members beaten by a lower-ε one."""
    members = [Member(f"m{i}", None, PrivacyMetadata(eps, 0.0, ("d",))) for i, (eps, _, _) in enumerate(rows)]
    first = fairness_verdicts(members, {f"m{i}": u for i, (_, u, _) in enumerate(rows)}, on="public test")
    second = fairness_verdicts(members, {f"m{i}": v for i, (_, _, v) in enumerate(rows)}, on="public test")
    for i, (eps, u, _) in enumerate(rows):
        name = f"m{i}"
        lower = sorted(f"m{j}" for j, (e, _, _) in enumerate(rows) if e < eps)
        assert first[name]["compared_with"] == second[name]["compared_with"] == lower
        assert first[name]["flagged"] == any(rows[int(o[1:])][1] > u for o in lower)
