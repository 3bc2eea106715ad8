"""Agreement validation on private data: the mechanisms keep the reference's predictions inside
the vault (no frozen copy of the model), and answer exactly as scoring against a frozen copy did."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_dpdedup.errors import PrivacyError
from hf_dpdedup.privacy import LaplaceSampler, NaiveLaplaceValidator, PrivateDataset, SVTSession
from hf_dpdedup.privacy.charge import Charge
from hf_dpdedup.privacy.private_data import (
    SCORE_GRID,
    agreement_total,
    hold_predictions,
    holds_private,
    open_grant,
    revoke_grant,
)


def predict(model, batch):
    return model(batch["x"]).argmax(-1)


def frozen_agreement(original):
    """The old rule: score against a frozen copy of the reference, recomputed at every query."""
    def score(model, batch):
        return (predict(model, batch) == predict(original, batch)).float()
    return score


def private_set(n: int = 300, batch_size: int = 64) -> PrivateDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return PrivateDataset({"x": x, "y": torch.zeros(n, dtype=torch.long)}, dataset_id="agree", public_size=n,
                          batch_size=batch_size)


def edits(model, steps: int, seed: int = 1):
    """Edit ``model`` in place, step by step (a search's groups of replacements), yielding after each."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        with torch.no_grad():
            model.weight.add_((0.02 * (step + 1)) * torch.randn(model.weight.shape, generator=g))
        yield model


@pytest.mark.parametrize("kind", ["svt", "naive"])
def test_held_predictions_answer_exactly_as_a_frozen_copy(kind):
    answers = {}
    for mode in ("frozen", "held"):
        torch.manual_seed(3)
        model = torch.nn.Linear(6, 4)
        ds = private_set()
        scoring = (dict(score_fn=frozen_agreement(copy.deepcopy(model))) if mode == "frozen"
                   else dict(predict_fn=predict))
        common = dict(reference=model, allowed_drop=0.1, sampler=LaplaceSampler.seeded_for_tests(11), **scoring)
        mechanism = (SVTSession(ds, epsilon=5.0, cutoff=20, **common) if kind == "svt"
                     else NaiveLaplaceValidator(ds, epsilon_per_query=2.0, **common))
        answers[mode] = [mechanism.accepts(m) for m in edits(model, 12)]
        answers[mode + "_eps"] = mechanism.epsilon_spent
    assert answers["frozen"] == answers["held"]
    assert answers["frozen_eps"] == answers["held_eps"]
    assert True in answers["held"] and False in answers["held"]  # both answers occur: the test can tell


def test_closing_wipes_the_held_predictions_and_later_reads_are_refused():
    model = torch.nn.Linear(6, 4)
    ds = private_set()
    session = SVTSession(ds, reference=model, predict_fn=predict, epsilon=1.0, cutoff=3, allowed_drop=0.1,
                         sampler=LaplaceSampler.seeded_for_tests(0))
    assert holds_private(ds, session)
    session.close()
    assert not holds_private(ds, session)
    grant = open_grant(ds, Charge("after-close", ("agree",), 0.1, 0.0, "test"))
    with pytest.raises(PrivacyError):
        agreement_total(ds, grant, session, model, predict)  # nothing is held for it any more
    revoke_grant(ds, grant)
    assert ds.raw_accesses == 0


def test_a_mechanism_takes_exactly_one_of_score_fn_and_predict_fn():
    model, ds = torch.nn.Linear(6, 4), private_set()
    for kwargs in ({}, {"score_fn": frozen_agreement(model), "predict_fn": predict}):
        with pytest.raises(ValueError, match="exactly one"):
            SVTSession(ds, reference=model, epsilon=1.0, cutoff=3, allowed_drop=0.1, **kwargs)


class Table:
    """A "model" that predicts a fixed label (or label sequence) per example, read from the batch."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = torch.as_tensor(labels)

    def __call__(self, batch):
        return self.labels[batch["i"]]


class Owner:
    """A mechanism stand-in (the vault keys what it holds by weak reference to its mechanism)."""


def lookup(model, batch):
    return model(batch)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 3), st.integers(1, 16), st.data())
def test_agreement_total_counts_the_examples_whose_every_prediction_agrees(n, width, batch_size, data):
    reference = data.draw(st.lists(st.lists(st.integers(0, 2), min_size=width, max_size=width), min_size=n, max_size=n))
    candidate = data.draw(st.lists(st.lists(st.integers(0, 2), min_size=width, max_size=width), min_size=n, max_size=n))
    ds = PrivateDataset({"i": torch.arange(n)}, dataset_id="table", public_size=n, batch_size=batch_size)
    grant = open_grant(ds, Charge("table", ("table",), 1.0, 0.0, "test"))
    owner = Owner()
    assert hold_predictions(ds, grant, owner, Table(np.array(reference)), lookup) == n * SCORE_GRID
    expected = sum(r == c for r, c in zip(reference, candidate))
    assert agreement_total(ds, grant, owner, Table(np.array(candidate)), lookup) == expected * SCORE_GRID
    # one example changed moves the total by at most one example's score: sensitivity as for utility
    flipped = [list(row) for row in candidate]
    flipped[0][0] = (flipped[0][0] + 1) % 3
    moved = agreement_total(ds, grant, owner, Table(np.array(flipped)), lookup)
    assert abs(moved - expected * SCORE_GRID) <= SCORE_GRID
    revoke_grant(ds, grant)
