"""Validators: the one question the search asks, "is this candidate model still good enough?".

All validators share one interface (``accepts(model) -> bool``, ``validations``, ``halted``) so the
search strategies never know whether the data behind it is public or private:

* :class:`PublicValidator`: plain utility on public data (free, exact);
* :class:`SVTValidator`: private data through the Sparse Vector Technique (ε charged once per model);
* :class:`NaiveValidator`: private data, each query a charged Laplace release (the baseline).

Utility is always a mean of per-example scores in [0, 1] given by ``score_fn(model, batch)``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Protocol

import torch

from ..privacy import LaplaceSampler, NaiveLaplaceValidator, PrivateDataset, SVTSession

ScoreFn = Callable[[Any, Any], Any]


class Validator(Protocol):
    validations: int

    @property
    def halted(self) -> bool: ...

    def accepts(self, model: Any) -> bool: ...


@torch.no_grad()
def public_utility(model: torch.nn.Module, batches: Iterable[Any], score_fn: ScoreFn) -> float:
    """Mean per-example score on public data (never call this with private data)."""
    if isinstance(batches, PrivateDataset):
        batches.evaluate()  # raises PrivateDataAccessError and counts the attempt
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            scores = torch.as_tensor(score_fn(model, batch), dtype=torch.float64).clamp(0, 1)
            total += float(scores.sum())
            count += scores.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("The public validation data is empty: pass at least one batch.")
    return total / count


class PublicValidator:
    """Accept while utility ≥ max(reference − allowed_drop, floor) on public batches."""

    def __init__(
        self,
        batches: list[Any],
        score_fn: ScoreFn,
        *,
        reference: torch.nn.Module,
        allowed_drop: float,
        floor: float | None = None,
    ) -> None:
        self.batches, self.score_fn = batches, score_fn
        self.reference_utility = public_utility(reference, batches, score_fn)
        self.minimum = self.reference_utility - allowed_drop
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


class SVTValidator:
    """Private validation through one SVT session per target model (see ``privacy.svt``)."""

    def __init__(
        self,
        dataset: PrivateDataset,
        score_fn: ScoreFn,
        *,
        reference: torch.nn.Module,
        allowed_drop: float,
        epsilon: float,
        cutoff: int,
        floor: float | None = None,
        sampler: LaplaceSampler | None = None,
        label: str | None = None,
    ) -> None:
        self.session = SVTSession(
            dataset, reference=reference, score_fn=score_fn, epsilon=epsilon, cutoff=cutoff,
            allowed_drop=allowed_drop, floor=floor, sampler=sampler, label=label,
        )
        self.validations = 0

    @property
    def halted(self) -> bool:
        return self.session.halted

    @property
    def charges(self) -> list:
        return [self.session.charge]

    def accepts(self, model: torch.nn.Module) -> bool:
        self.validations += 1
        return self.session.accepts(model)


class NaiveValidator:
    """Private validation where every query is its own charged Laplace release (baseline)."""

    def __init__(
        self,
        dataset: PrivateDataset,
        score_fn: ScoreFn,
        *,
        reference: torch.nn.Module,
        allowed_drop: float,
        epsilon_per_query: float,
        floor: float | None = None,
        sampler: LaplaceSampler | None = None,
        label: str | None = None,
    ) -> None:
        self.inner = NaiveLaplaceValidator(
            dataset, reference=reference, score_fn=score_fn, epsilon_per_query=epsilon_per_query,
            allowed_drop=allowed_drop, floor=floor, sampler=sampler, label=label,
        )
        self.validations = 0

    @property
    def halted(self) -> bool:
        return False

    @property
    def charges(self) -> list:
        return list(self.inner.charges)

    def accepts(self, model: torch.nn.Module) -> bool:
        self.validations += 1
        return self.inner.accepts(model)
