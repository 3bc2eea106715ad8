"""Validators: the one question the search asks, "is this candidate model still good enough?".

All validators share one interface (``accepts(model) -> bool``, ``validations``, ``halted``) so the
search strategies never know whether the data behind it is public or private:

* :class:`PublicValidator`: plain utility on public data (free, exact);
* :class:`MechanismValidator` around an ``SVTSession``: private data through the Sparse Vector
  Technique (ε charged once per model), or around a ``NaiveLaplaceValidator``: each query a charged
  Laplace release (the baseline).

Utility is always a mean of per-example scores in [0, 1] given by ``score_fn(model, batch)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import torch

from ..privacy import NaiveLaplaceValidator, PrivateDataset, SVTSession
from ..collective import current_collective, shard_range

ScoreFn = Callable[[Any, Any], Any]


class Validator(Protocol):
    validations: int

    @property
    def halted(self) -> bool: ...

    def accepts(self, model: Any) -> bool: ...

    def close(self) -> None:
        """Called once the search is done (private mechanisms wipe their reference)."""


@dataclass(frozen=True)
class Utility:
    """A public utility (mean per-example score) with its standard error over ``n`` examples."""

    mean: float
    se: float
    n: int


def public_utility(model: torch.nn.Module, batches: Iterable[Any], score_fn: ScoreFn) -> float:
    """Mean per-example score on public data (never call this with private data)."""
    return public_utility_stats(model, batches, score_fn).mean


@torch.no_grad()
def public_utility_stats(model: torch.nn.Module, batches: Iterable[Any], score_fn: ScoreFn) -> Utility:
    """Mean per-example score on public data and its standard error (sample std / √n).

    Inside a ``collective_scope`` each process scores its contiguous shard of the batches; the
    per-batch sums are then added in batch order, so the result is bit-identical to one process.
    """
    if isinstance(batches, PrivateDataset):
        batches.evaluate()  # raises PrivateDataAccessError and counts the attempt
    batches = list(batches)
    collective = current_collective()
    mine = shard_range(len(batches), collective.rank, collective.size)
    sums, squares, counts = [0.0] * len(batches), [0.0] * len(batches), [0] * len(batches)
    was_training = model.training
    model.eval()
    try:
        for i in mine:
            scores = torch.as_tensor(score_fn(model, batches[i]), dtype=torch.float64).clamp(0, 1)
            sums[i], squares[i], counts[i] = float(scores.sum()), float(scores.square().sum()), scores.numel()
    finally:
        model.train(was_training)
    if collective.size > 1:  # each entry has one non-zero addend: the sum is exact
        sums, squares, counts = collective.sum(sums), collective.sum(squares), collective.sum(counts)
    total, total_sq, count = 0.0, 0.0, 0
    for batch_sum, batch_sq, batch_count in zip(sums, squares, counts):
        total += batch_sum
        total_sq += batch_sq
        count += batch_count
    if count == 0:
        raise ValueError("The public validation data is empty: pass at least one batch.")
    mean = total / count
    variance = max(0.0, total_sq / count - mean * mean) * count / max(1, count - 1)
    return Utility(mean, math.sqrt(variance / count), count)


@torch.no_grad()
def agreement_batches(batches: list[Any], reference: torch.nn.Module, predict_fn: Callable[[Any, Any], Any] | None) -> list[Any]:
    """Public batches relabelled with ``reference``'s own predictions (``batch["labels"]``).

    Scored with the task's correctness score, a candidate's utility is then its agreement with the
    reference, so ``1 − agreement`` is the share of examples whose prediction the edits changed.
    """
    if predict_fn is None:
        raise ValueError("agreement validation needs DedupData.predict_fn (per-example predictions).")
    if isinstance(batches, PrivateDataset):
        batches.evaluate()  # raises PrivateDataAccessError: private data never leaves its mechanisms
    was_training = reference.training
    reference.eval()
    try:
        return [{**batch, "labels": torch.as_tensor(predict_fn(reference, batch))} for batch in batches]
    finally:
        reference.train(was_training)


class PublicValidator:
    """Accept while utility ≥ max(reference − threshold − margin_se · SE, floor) on public batches.

    ``threshold`` is the allowed utility drop (``DedupConfig.threshold``). ``margin_se`` widens it by that many standard errors of the reference utility on
    these batches (0: the plain threshold) — the tolerance the benchmarks judge test drops with."""

    def __init__(
        self,
        batches: list[Any],
        score_fn: ScoreFn,
        *,
        reference: torch.nn.Module,
        threshold: float,
        floor: float | None = None,
        margin_se: float = 0.0,
    ) -> None:
        self.batches, self.score_fn = batches, score_fn
        stats = public_utility_stats(reference, batches, score_fn)
        self.reference_utility, self.reference_se = stats.mean, stats.se
        self.minimum = self.reference_utility - threshold - margin_se * stats.se
        if floor is not None:
            self.minimum = max(self.minimum, floor)
        self.validations = 0
        self.last_utility: float | None = None

    @property
    def halted(self) -> bool:
        return False

    def accepts(self, model: torch.nn.Module) -> bool:
        self.validations += 1
        self.last_utility = public_utility(model, self.batches, self.score_fn)
        return self.last_utility >= self.minimum

    def close(self) -> None:
        """Nothing to wipe: public data (same interface as :class:`MechanismValidator`)."""


class MechanismValidator:
    """A charged private-data mechanism (:class:`SVTSession` or :class:`NaiveLaplaceValidator`)
    behind the validator interface: counts validations, exposes its charges for the ledger."""

    def __init__(self, mechanism: SVTSession | NaiveLaplaceValidator) -> None:
        self.mechanism = mechanism
        self.validations = 0

    @property
    def halted(self) -> bool:
        return getattr(self.mechanism, "halted", False)

    @property
    def charges(self) -> list:
        return list(self.mechanism.charges)

    def accepts(self, model: torch.nn.Module) -> bool:
        self.validations += 1
        return self.mechanism.accepts(model)

    def close(self) -> None:
        """End the mechanism: its grant is revoked and its private reference wiped."""
        self.mechanism.close()
