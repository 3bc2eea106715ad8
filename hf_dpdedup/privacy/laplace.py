"""Laplace mechanisms on private data: a charged utility release and the naive validation baseline.

* :func:`release_utility` — U(M) + Lap(1/(n·ε)) with U = Σ scores / n and n the data set's public
  size: adding or removing one example (score in [0, 1]) moves U by at most 1/n, so the release is
  ε-DP under add/remove (and under replace-one). Use it where a private utility must
  drive a later decision, e.g. the interactive floor U'_{i−1} of the next model.
* :class:`NaiveLaplaceValidator` — the baseline of the paper's §5.8: every validation is its own
  Laplace release of the drop q (sensitivity ≤ 2/n, n public), compared with the allowed drop, and charged
  ε_q. k validations cost k·ε_q (loose); SVT costs its ε once however many validations it makes.

Noise is exact discrete Laplace on integer sums (see :mod:`.noise`); the released float is a
post-processing of an exact integer, so no floating-point leak. Across processes
(``collective_scope``) the integer sums are added over the shards and only the main process draws
the noise; the others receive the released value or the decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ..errors import PrivateDataAccessError
from ._checks import check_epsilon
from .charge import Charge, sum_rounded_up
from .noise import SEEDED_LABEL, LaplaceSampler
from .private_data import (
    SCORE_GRID,
    NoisedValue,
    PredictFn,
    PrivateDataset,
    ScoreFn,
    current_collective,
    mechanism_id,
    open_grant,
    quantized_total,
    release_from_main,
    revoke_grant,
)
from .svt import DropQuery


@dataclass(frozen=True)
class NoisyRelease:
    """A utility released with Laplace noise; ``value`` is public, ``charge`` goes to the ledger."""

    value: float
    epsilon: float
    scale: float  # Laplace scale in utility units, 1/(n·ε) with n the public size
    charge: Charge
    seeded: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "epsilon": self.epsilon,
            "noise_scale": self.scale,
            "source_id": self.charge.source_id,
            "noise": SEEDED_LABEL if self.seeded else "secure",
        }


def release_utility(
    dataset: PrivateDataset,
    model: Any,
    *,
    score_fn: ScoreFn,
    epsilon: float,
    sampler: LaplaceSampler | None = None,
    label: str | None = None,
) -> NoisyRelease:
    """Charge ε to ``dataset`` and release U(model) + Lap(1/(n·ε)), clamped to [0, 1] (n = public size)."""
    eps = check_epsilon(epsilon)
    sampler = sampler if sampler is not None else LaplaceSampler.secure()
    collective = current_collective()
    source_id = collective.from_main(lambda: mechanism_id("laplace", dataset, label))
    charge = Charge(source_id, (dataset.dataset_id,), eps, 0.0, "laplace", seeded=sampler.seeded)
    grant = open_grant(dataset, charge)
    try:
        total = quantized_total(dataset, grant, model, score_fn)
    finally:
        revoke_grant(dataset, grant)
    scale_units = Fraction(SCORE_GRID) / Fraction(eps)  # one example moves the sum by ≤ SCORE_GRID
    units = dataset.public_size * SCORE_GRID  # never |D|: the grid of released values would reveal it

    def noisy_value() -> NoisedValue:
        noisy = Fraction(total + sampler.discrete_laplace(scale_units), units)
        return NoisedValue(min(max(noisy, Fraction(0)), Fraction(1)))

    value = float(release_from_main(collective, noisy_value))
    return NoisyRelease(value, eps, float(scale_units / units), charge, sampler.seeded)


def naive_epsilon(num_queries: int, epsilon_per_query: float) -> float:
    """Loose cost of the naive baseline: k separately charged releases cost k·ε_q."""
    return sum_rounded_up([check_epsilon(epsilon_per_query)] * int(num_queries))


class NaiveLaplaceValidator:
    """Baseline validator: each query is a charged Laplace release of the drop, compared with T.

    Same interface as :class:`~hf_dpdedup.privacy.svt.SVTSession` (``accepts``), but every query
    charges ``epsilon_per_query`` to the data set (and fails once its ``epsilon_budget`` is spent).
    """

    def __init__(
        self,
        dataset: PrivateDataset,
        *,
        reference: Any,
        score_fn: ScoreFn | None = None,
        epsilon_per_query: float,
        allowed_drop: float,
        floor: float | None = None,
        sampler: LaplaceSampler | None = None,
        label: str | None = None,
        predict_fn: PredictFn | None = None,
    ) -> None:
        self._eps = check_epsilon(epsilon_per_query, name="epsilon_per_query")
        self._q = DropQuery(self, dataset, kind="naive", score_fn=score_fn, allowed_drop=allowed_drop, floor=floor,
                            sampler=sampler, label=label, predict_fn=predict_fn)
        self._sampler, self._dataset, self._collective = self._q.sampler, dataset, self._q.collective
        self._threshold, self._label = self._q.threshold, self._q.source_id
        self.charges: list[Charge] = []
        self.queries = 0
        # The reference is read now (the engine edits it in place later), under the first query's charge.
        self._pending = self._open_query()
        self.closed = False
        self._q.hold_reference(self._pending, reference)

    @property
    def epsilon_spent(self) -> float:
        return sum_rounded_up(c.epsilon for c in self.charges)

    @property
    def seeded(self) -> bool:
        return self._sampler.seeded

    def accepts(self, candidate: Any) -> bool:
        """Charge ε_q, release q + Lap(2/(n·ε_q)) and accept iff it is below the allowed drop."""
        if self.closed:
            raise PrivateDataAccessError(f"Validator {self._label!r} is closed: open a new one to query again.")
        grant, self._pending = self._pending or self._open_query(), None
        try:
            query = self._q.query(grant, candidate)
        finally:
            revoke_grant(self._dataset, grant)
        self.queries += 1
        scale_units = Fraction(2 * SCORE_GRID) / Fraction(self._eps)
        # main process only: the noise never exists on the others, they receive the answer
        return release_from_main(
            self._collective, lambda: bool(query + self._sampler.discrete_laplace(scale_units) < self._threshold))

    def close(self) -> None:
        """No further queries; the private reference is wiped (the charges made stay charged)."""
        if self._pending is not None:
            revoke_grant(self._dataset, self._pending)
            self._pending = None
        self.closed = True
        self._q.wipe()

    def _open_query(self) -> Any:
        charge = Charge(f"{self._label}/q{len(self.charges) + 1}", (self._dataset.dataset_id,), self._eps, 0.0,
                        "naive_laplace", seeded=self._sampler.seeded)
        grant = open_grant(self._dataset, charge)
        self.charges.append(charge)
        return grant
