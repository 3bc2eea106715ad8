"""Sparse Vector Technique (AboveThreshold with cut-off c) for accept/revert decisions on private data.

One :class:`SVTSession` per target model. The query is the utility drop ``q = U(M) − U(M')`` of a
candidate ``M'`` against the reference ``M`` (the target as it was when the session opened), both
sums over the private set D of per-example scores in [0, 1] divided by its public size n (fixed in
advance, never |D|). Adding or removing one example moves q by at most 1/n, replacing one by at
most 2/n; we use Δ = 2/n, valid under both relations (add/remove is the package's relation). With ε = ε1 + ε2 and ε1 : ε2 = 1 : (2c)^(2/3):

* ρ ~ Lap(Δ/ε1) is drawn once, when the session opens;
* each query draws ν ~ Lap(2cΔ/ε2); the answer "too big a drop" is ``q + ν ≥ T + ρ``;
* after c such answers the session halts; the whole session costs ε once, however many queries.

This is Lyu, Su & Li (VLDB 2017), Alg. 1 with the 2c factor for queries that are not monotone.
Internally all quantities are exact integers in units of 1/(|D|·SCORE_GRID) and the noise is
exact discrete Laplace with the same scales, so the proof's shift arguments hold verbatim.

Across processes (``collective_scope``), the private sums are added over the processes' shards,
and ρ, every ν and every answer come from the main process only: the others receive the answer.
The mechanism, its noise and its charge are those of one process.

A public floor (``floor``, e.g. the previous model's released utility) turns the query into
``max(U(M) − U(M'), T + floor − U(M'))``: too big a drop *or* below the floor. Each term has
sensitivity ≤ 2/n, so the max does too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ..errors import PrivacyBudgetError, SVTHaltedError
from ._checks import check_cutoff, check_epsilon, check_unit_interval
from .charge import Charge
from .noise import SEEDED_LABEL, LaplaceSampler
from .private_data import (
    SCORE_GRID,
    PredictFn,
    PrivateDataset,
    ScoreFn,
    agreement_total,
    current_collective,
    held_private,
    hold_predictions,
    hold_private,
    mechanism_id,
    open_grant,
    quantized_total,
    release_from_main,
    revoke_grant,
    wipe_private,
)


@dataclass(frozen=True)
class SVTParameters:
    """Budget split and noise scales of one SVT session (scales in utility units and exact grid units)."""

    epsilon: float
    cutoff: int
    size: int
    epsilon_threshold: float  # ε1
    epsilon_queries: float  # ε2
    threshold_scale_units: Fraction  # Δ/ε1 in grid units
    query_scale_units: Fraction  # 2cΔ/ε2 in grid units

    @property
    def sensitivity(self) -> float:
        """Δ = 2/n (n the public size), in utility units."""
        return 2.0 / self.size

    @property
    def threshold_scale(self) -> float:
        """Scale of ρ in utility units: Δ/ε1."""
        return float(self.threshold_scale_units / (self.size * SCORE_GRID))

    @property
    def query_scale(self) -> float:
        """Scale of each ν in utility units: 2cΔ/ε2."""
        return float(self.query_scale_units / (self.size * SCORE_GRID))

    def to_dict(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon,
            "cutoff": self.cutoff,
            "public_size": self.size,
            "epsilon_threshold": self.epsilon_threshold,
            "epsilon_queries": self.epsilon_queries,
            "sensitivity": self.sensitivity,
            "threshold_noise_scale": self.threshold_scale,
            "query_noise_scale": self.query_scale,
        }


def split_budget(epsilon: float, cutoff: int) -> tuple[float, float]:
    """ε1, ε2 with ε1 : ε2 = 1 : (2c)^(2/3) and ε1 + ε2 ≤ ε exactly (not just up to rounding)."""
    eps, c = check_epsilon(epsilon), check_cutoff(cutoff)
    eps1 = eps / (1.0 + (2.0 * c) ** (2.0 / 3.0))
    eps2 = eps - eps1
    while Fraction(eps1) + Fraction(eps2) > Fraction(eps):
        eps2 = math.nextafter(eps2, 0.0)
    return eps1, eps2


def svt_parameters(*, epsilon: float, cutoff: int, size: int) -> SVTParameters:
    """All SVT constants for a private set of ``size`` examples (pure function)."""
    if not (isinstance(size, int) and size >= 1):
        raise PrivacyBudgetError(f"The private validation set must have ≥ 1 example, got size {size!r}.")
    eps1, eps2 = split_budget(epsilon, cutoff)
    delta_units = 2 * SCORE_GRID  # Δ = 2/n in units of 1/(n·SCORE_GRID)
    return SVTParameters(
        epsilon=float(epsilon),
        cutoff=cutoff,
        size=size,
        epsilon_threshold=eps1,
        epsilon_queries=eps2,
        threshold_scale_units=Fraction(delta_units) / Fraction(eps1),
        query_scale_units=Fraction(2 * cutoff * delta_units) / Fraction(eps2),
    )


class DropQuery:
    """The query SVT and the naive Laplace validator (:mod:`.laplace`) both answer, and their shared
    set-up: ``q = U(M) − U(M')`` (with a public ``floor``: ``max(q, T + floor − U(M'))``) in exact grid
    units, the allowed drop ``T``, the sampler (secure unless one is given), the collective and the
    mechanism's source id. ``owner`` (the validator) holds the private reference sum U(M).
    With ``predict_fn`` instead of ``score_fn`` the utility is agreement with the reference: the
    vault keeps the reference's predictions (U(M) = 1 per example) and a candidate scores 1 where it
    predicts the same — no frozen copy of the reference is needed."""

    def __init__(self, owner: Any, dataset: PrivateDataset, *, kind: str, score_fn: ScoreFn | None, allowed_drop: float,
                 floor: float | None, sampler: LaplaceSampler | None, label: str | None,
                 predict_fn: PredictFn | None = None) -> None:
        if (score_fn is None) == (predict_fn is None):
            raise ValueError("Give a private mechanism exactly one of score_fn (utility) and predict_fn "
                             "(agreement with the reference's predictions).")
        self.owner, self.dataset, self.score_fn, self.predict_fn = owner, dataset, score_fn, predict_fn
        self.sampler = sampler if sampler is not None else LaplaceSampler.secure()
        units = Fraction(dataset.public_size * SCORE_GRID)
        self.threshold = Fraction(check_unit_interval(allowed_drop, name="allowed_drop")) * units
        self.floor = None if floor is None else Fraction(check_unit_interval(floor, name="floor")) * units
        self.collective = current_collective()
        self.source_id = self.collective.from_main(lambda: mechanism_id(kind, dataset, label))

    def hold_reference(self, grant: Any, reference: Any) -> None:
        """Read U(M) of ``reference`` under ``grant`` and keep it inside the firewall (under
        agreement: its predictions, and U(M) = 1 per example)."""
        if self.predict_fn is not None:
            total = hold_predictions(self.dataset, grant, self.owner, reference, self.predict_fn)
        else:
            total = quantized_total(self.dataset, grant, reference, self.score_fn)
        hold_private(self.dataset, self.owner, total)

    def query(self, grant: Any, candidate: Any) -> Fraction:
        """The exact (private) query of ``candidate`` under ``grant``, in grid units."""
        if self.predict_fn is not None:
            total = agreement_total(self.dataset, grant, self.owner, candidate, self.predict_fn)
        else:
            total = quantized_total(self.dataset, grant, candidate, self.score_fn)
        query = Fraction(held_private(self.dataset, self.owner) - total)
        if self.floor is not None:
            query = max(query, self.threshold + self.floor - total)
        return query

    def wipe(self) -> None:
        """Forget the private reference (the mechanism is closed)."""
        wipe_private(self.dataset, self.owner)


class SVTSession:
    """AboveThreshold over one target model's deduplication; answers only "acceptable or not".

    Opening the session charges ε to ``dataset`` once, reads the reference utility U(M) inside the
    mechanism (so ``reference`` may then be modified in place) and draws ρ.

    >>> session = SVTSession(ds, reference=model, score_fn=acc, epsilon=1.0, cutoff=3,
    ...                      allowed_drop=0.01)                                     # doctest: +SKIP
    >>> while not session.halted and plan.has_next():                               # doctest: +SKIP
    ...     plan.apply_next(model)
    ...     if not session.accepts(model): plan.revert_last(model)
    >>> ledger_charges.append(session.charge)                                       # doctest: +SKIP
    """

    def __init__(
        self,
        dataset: PrivateDataset,
        *,
        reference: Any,
        score_fn: ScoreFn | None = None,
        epsilon: float,
        cutoff: int,
        allowed_drop: float,
        floor: float | None = None,
        sampler: LaplaceSampler | None = None,
        label: str | None = None,
        predict_fn: PredictFn | None = None,
    ) -> None:
        self.parameters = svt_parameters(epsilon=epsilon, cutoff=cutoff, size=dataset.public_size)
        self._q = DropQuery(self, dataset, kind="svt", score_fn=score_fn, allowed_drop=allowed_drop, floor=floor,
                            sampler=sampler, label=label, predict_fn=predict_fn)
        self._sampler, self._dataset, self._collective = self._q.sampler, dataset, self._q.collective
        self._threshold = self._q.threshold
        self.charge = Charge(self._q.source_id, (dataset.dataset_id,), self.parameters.epsilon, 0.0, "svt",
                             seeded=self._sampler.seeded)
        self._grant = open_grant(dataset, self.charge)
        self._q.hold_reference(self._grant, reference)
        # Only the main process holds ρ and draws ν; the others learn nothing but the answers.
        self._rho = (self._sampler.discrete_laplace(self.parameters.threshold_scale_units)
                     if self._collective.is_main else None)
        self.queries = 0
        self.above_count = 0

    @property
    def halted(self) -> bool:
        """True after c "too big a drop" answers (or ``close()``): no further queries are answered."""
        return self._grant.revoked

    @property
    def charges(self) -> tuple[Charge, ...]:
        """Every charge of this mechanism: the session's whole ε, once (cf. the naive validator)."""
        return (self.charge,)

    @property
    def epsilon_spent(self) -> float:
        """The session's whole ε, charged once when it opened."""
        return self.charge.epsilon

    @property
    def seeded(self) -> bool:
        return self._sampler.seeded

    def accepts(self, candidate: Any) -> bool:
        """True if ``candidate``'s utility drop is acceptable (keep); False means revert.

        Each False counts towards the cut-off; after the c-th the session halts.
        """
        if self.halted:
            raise SVTHaltedError(
                f"SVT session {self.charge.source_id!r} has halted after {self.above_count} 'too big a drop' "
                f"answers (cut-off {self.parameters.cutoff}); stop deduplicating this model."
            )
        query = self._q.query(self._grant, candidate)
        too_big = release_from_main(self._collective, lambda: self._too_big(query))
        self.queries += 1
        if too_big:
            self.above_count += 1
            if self.above_count >= self.parameters.cutoff:
                self.close()
        return not too_big

    def _too_big(self, query: Fraction) -> bool:
        nu = self._sampler.discrete_laplace(self.parameters.query_scale_units)
        return bool(query + nu >= self._threshold + self._rho)

    def close(self) -> None:
        """End the session (its ε stays charged) and wipe its private reference; later queries raise
        SVTHaltedError."""
        revoke_grant(self._dataset, self._grant)
        self._q.wipe()

    def to_dict(self) -> dict[str, Any]:
        """Public facts for reports: parameters, counts, noise mode (never a utility)."""
        return {
            "source_id": self.charge.source_id,
            "dataset": self._dataset.dataset_id,
            **self.parameters.to_dict(),
            "queries": self.queries,
            "too_big_a_drop_answers": self.above_count,
            "halted": self.halted,
            "noise": SEEDED_LABEL if self.seeded else "secure",
        }
