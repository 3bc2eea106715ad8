"""The private-data firewall: no code path reads private data without charging it."""

from __future__ import annotations

import ast
import copy
import pickle
from pathlib import Path

import pytest
import torch

import hf_dpdedup
from hf_dpdedup.errors import PrivacyAccountingError, PrivacyBudgetError, PrivacyError, PrivateDataAccessError
from hf_dpdedup.privacy import (
    SCORE_GRID,
    Charge,
    LaplaceSampler,
    NaiveLaplaceValidator,
    PrivateDataset,
    SVTSession,
    account,
    release_utility,
)
from hf_dpdedup.privacy.private_data import _quantize, open_grant, quantized_scores, revoke_grant


def private_set(n: int = 20, **kw) -> tuple[list[int], PrivateDataset]:
    examples = list(range(n))
    return examples, PrivateDataset(examples, dataset_id="val", **{"public_size": n, **kw})


@pytest.mark.parametrize(
    "attempt",
    [
        lambda ds: ds.evaluate(object(), lambda m, b: b),
        lambda ds: list(ds),
        lambda ds: ds[0],
        lambda ds: pickle.dumps(ds),
        lambda ds: copy.copy(ds),
        lambda ds: copy.deepcopy({"data": ds}),
    ],
    ids=["evaluate", "iterate", "index", "pickle", "copy", "deepcopy"],
)
def test_every_raw_access_is_refused_and_counted(attempt):
    _, ds = private_set()
    with pytest.raises(PrivateDataAccessError, match="charged mechanisms"):
        attempt(ds)
    assert ds.raw_accesses == 1 and ds.charged_reads == 0


def test_no_attribute_exposes_the_examples():
    examples, ds = private_set()
    assert not hasattr(ds, "__dict__") and not hasattr(ds, "examples")
    for name in dir(ds):
        if name in {"evaluate", "__getitem__", "__iter__"} or name.startswith("__"):
            continue
        assert getattr(ds, name) is not examples, name
    assert repr(ds) == "PrivateDataset(dataset_id='val', public_size=20, epsilon_spent=0.0)"


def test_reads_need_a_live_grant_from_a_committed_charge():
    _, ds = private_set()
    with pytest.raises(PrivateDataAccessError):
        quantized_scores(ds, None, object(), lambda m, b: [1.0] * len(b))
    grant = open_grant(ds, Charge("svt#x", "val", 1.0, kind="svt"))
    assert quantized_scores(ds, grant, object(), lambda m, b: [1.0] * len(b)).sum() == 20 * SCORE_GRID
    revoke_grant(ds, grant)
    with pytest.raises(PrivateDataAccessError):
        quantized_scores(ds, grant, object(), lambda m, b: [1.0] * len(b))
    _, other = private_set()
    with pytest.raises(PrivacyError):
        open_grant(other, Charge("c", "another-set", 1.0, kind="svt"))
    assert ds.raw_accesses == 2 and ds.charged_reads == 1 and ds.epsilon_spent == 1.0


def test_mechanism_ids_never_repeat_on_a_data_set():
    _, ds = private_set()
    score = lambda m, b: [0.5] * len(b)  # noqa: E731
    a = SVTSession(ds, reference=object(), score_fn=score, epsilon=0.5, cutoff=1, allowed_drop=0.1)
    b = SVTSession(ds, reference=object(), score_fn=score, epsilon=0.5, cutoff=1, allowed_drop=0.1)
    assert a.charge.source_id != b.charge.source_id and account(ds.charges).epsilon_loose == 1.0
    release_utility(ds, object(), score_fn=score, epsilon=0.1, label="floor:m1")
    with pytest.raises(PrivacyAccountingError, match="unique label"):
        release_utility(ds, object(), score_fn=score, epsilon=0.1, label="floor:m1")
    assert len(ds.charges) == 3


def test_the_budget_cap_is_checked_before_charging():
    _, ds = private_set(epsilon_budget=1.0)
    SVTSession(ds, reference=object(), score_fn=lambda m, b: [0.5] * len(b), epsilon=0.75, cutoff=1, allowed_drop=0.1)
    with pytest.raises(PrivacyBudgetError, match="budget"):
        SVTSession(ds, reference=object(), score_fn=lambda m, b: [0.5] * len(b), epsilon=0.5, cutoff=1, allowed_drop=0.1)
    assert len(ds.charges) == 1 and ds.charged_reads == 1


def test_invalid_private_sets_are_refused():
    with pytest.raises(PrivacyBudgetError, match="empty"):
        PrivateDataset([], dataset_id="val", public_size=1)
    with pytest.raises(PrivacyBudgetError, match="one length"):
        PrivateDataset({"x": [1, 2], "y": [1]}, dataset_id="val", public_size=2)
    with pytest.raises(PrivacyBudgetError, match="dataset_id"):
        PrivateDataset([1], dataset_id="", public_size=1)
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(PrivacyBudgetError, match="public_size"):
            PrivateDataset([1], dataset_id="val", public_size=bad)


def test_scores_are_clipped_to_the_unit_interval_before_use():
    scores = _quantize([-3.0, 0.0, 0.5, 1.0, 7.0, float("nan"), float("inf")], 7)
    assert scores.tolist() == [0, 0, SCORE_GRID // 2, SCORE_GRID, SCORE_GRID, 0, SCORE_GRID]
    with pytest.raises(PrivacyError, match="one score per example"):
        _quantize([1.0], 2)


def test_score_fn_errors_do_not_leak_private_values():
    _, ds = private_set()

    def leaky(model, batch):
        raise ValueError(f"bad example {batch[3]!r}: secret-value")

    with pytest.raises(PrivacyError) as info:
        release_utility(ds, object(), score_fn=leaky, epsilon=1.0)
    assert "secret-value" not in str(info.value) and "ValueError" in str(info.value)
    assert info.value.__cause__ is None and info.value.__context__ is None
    assert ds.epsilon_spent == 1.0  # the attempt was charged before the read


def test_scoring_runs_without_gradients_and_restores_train_mode():
    _, ds = private_set()
    model = torch.nn.Linear(1, 1)
    model.train()

    def score(m, batch):
        assert not m.training and not torch.is_grad_enabled()
        out = m(torch.tensor(batch, dtype=torch.float32)[:, None])
        return torch.sigmoid(out[:, 0])

    release_utility(ds, model, score_fn=score, epsilon=1.0)
    assert model.training and model.weight.grad is None


def test_package_internals_that_read_private_data_are_used_only_by_mechanisms():
    """Static guard: only the mechanism modules may call the firewall's read path."""
    root = Path(hf_dpdedup.__file__).parent
    allowed = {root / "privacy" / f for f in ("private_data.py", "svt.py", "laplace.py")}
    guarded = {"quantized_scores", "quantized_total", "hold_predictions", "agreement_total", "_scores", "open_grant",
               "revoke_grant", "_VAULT", "_Grant"}
    offenders = []
    for path in root.rglob("*.py"):
        if path in allowed:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        names |= {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
        offenders += [f"{path.relative_to(root)}: {name}" for name in sorted(names & guarded)]
    assert offenders == []


# --- an engine-shaped run: two targets, in-place block swaps, SVT, a charged floor, the ledger ---------
def test_a_full_private_dedup_run_never_reads_unnoised_and_charges_everything():
    torch.manual_seed(0)
    x = torch.randn(400, 8)
    truth = torch.randn(8, 2)
    private = PrivateDataset({"x": x, "y": (x @ truth).argmax(-1)}, dataset_id="sst2", public_size=400,
                             batch_size=128)

    def score_fn(model, batch):
        return (model(batch["x"]).argmax(-1) == batch["y"]).float()

    def linear(weight):
        layer = torch.nn.Linear(8, 2, bias=False)
        layer.weight.data.copy_(weight)
        return layer

    base = linear(truth.T + 0.8 * torch.randn(2, 8))
    targets = [linear(truth.T + 0.1 * torch.randn(2, 8)), linear(truth.T + 0.05 * torch.randn(2, 8))]
    sampler = LaplaceSampler.seeded_for_tests(1)
    sessions, floor, reports = [], None, []
    for i, target in enumerate(targets):
        session = SVTSession(private, reference=target, score_fn=score_fn, epsilon=0.5, cutoff=2,
                             allowed_drop=0.05, floor=floor, sampler=sampler, label=f"svt:target{i}")
        for row in range(2):  # "blocks": weight rows, swapped in place and reverted on failure
            for col in range(8):
                if session.halted:
                    break
                original = target.weight.data[row, col].clone()
                target.weight.data[row, col] = base.weight.data[row, col]
                if not session.accepts(target):
                    target.weight.data[row, col] = original
        session.close()
        sessions.append(session)
        floor = release_utility(private, target, score_fn=score_fn, epsilon=0.1, sampler=sampler,
                                label=f"floor:target{i}").value
        training = [Charge("base", "sst2", 1.0, 1e-5), Charge(f"target{i}", "sst2", 2.0 + i, 1e-5)]
        reports.append(account(training + list(private.charges)))

    assert private.raw_accesses == 0
    assert private.charged_reads == sum(1 + s.queries for s in sessions) + len(targets)
    assert [c.source_id for c in private.charges] == ["svt:target0", "floor:target0", "svt:target1", "floor:target1"]
    # target0: base 1 + itself 2 + its SVT 0.5 + the floor release 0.1 (all on sst2)
    assert reports[0].epsilon_loose == pytest.approx(3.6)
    # target1 also carries target0's mechanisms: its floor came from them
    assert reports[1].epsilon_loose == pytest.approx(1 + 3 + 2 * 0.6)
    assert reports[1].seeded and reports[1].to_dict()["noise"].startswith("TEST ONLY")


@pytest.mark.parametrize("kind", ["svt", "naive"])
def test_the_exact_reference_sum_is_no_attribute_of_the_mechanism_and_is_wiped_on_close(kind):
    """Issue 13 (minor): the unnoised reference sum stays inside the firewall and dies with the session."""
    examples, ds = private_set(40)
    model = object()
    score = lambda m, b: [0.75] * len(b)  # noqa: E731
    sampler = LaplaceSampler.seeded_for_tests(0)
    if kind == "svt":
        mechanism = SVTSession(ds, reference=model, score_fn=score, epsilon=1.0, cutoff=2, allowed_drop=0.1,
                               sampler=sampler)
    else:
        mechanism = NaiveLaplaceValidator(ds, reference=model, score_fn=score, epsilon_per_query=0.5,
                                          allowed_drop=0.1, sampler=sampler)
    exact = int(40 * 0.75 * SCORE_GRID)
    assert ds.open_mechanisms == 1
    reachable = [getattr(mechanism, name, None) for name in dir(mechanism)]
    reachable += list(vars(mechanism).values())
    assert exact not in [v for v in reachable if isinstance(v, int) and not isinstance(v, bool)]
    mechanism.accepts(model)
    mechanism.close()
    with pytest.raises(PrivateDataAccessError):
        mechanism.accepts(model)
    assert ds.open_mechanisms == 0


class RecordingCollective:
    """A one-process collective that records everything a mechanism would send to the other processes."""

    rank, size, is_main = 0, 2, True

    def __init__(self) -> None:
        self.sent: list = []

    def sum(self, values):
        return list(values)

    def from_main(self, compute):
        value = compute()
        self.sent.append(value)
        return value


def test_only_decisions_and_noised_releases_cross_processes_at_run_time():
    from hf_dpdedup.collective import collective_scope
    from hf_dpdedup.privacy.private_data import NoisedValue, release_from_main

    _, ds = private_set(30)
    collective = RecordingCollective()
    score = lambda m, b: [0.5] * len(b)  # noqa: E731
    sampler = LaplaceSampler.seeded_for_tests(4)
    with collective_scope(collective):
        svt = SVTSession(ds, reference=None, score_fn=score, epsilon=1.0, cutoff=2, allowed_drop=0.1, sampler=sampler)
        svt.accepts(None)
        naive = NaiveLaplaceValidator(ds, reference=None, score_fn=score, epsilon_per_query=0.5, allowed_drop=0.1,
                                      sampler=sampler)
        naive.accepts(None)
        release_utility(ds, None, score_fn=score, epsilon=1.0, sampler=sampler)
        with pytest.raises(PrivacyError, match="only a boolean"):
            release_from_main(collective, lambda: 15 * SCORE_GRID)  # an unnoised sum
    private_outputs = [v for v in collective.sent if not isinstance(v, str)]  # str: mechanism ids
    assert private_outputs and all(type(v) is bool or isinstance(v, NoisedValue) for v in private_outputs)
