"""Privacy metadata carried by every model of a family.

A model's metadata says what it cost: (ε, δ), which private data set(s) it was trained on, and
where known the accountant history Opacus recorded, so the ledger can compose tightly (RDP)
instead of summing ε. It serialises to plain JSON for the constitution and the model card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import PrivacyBudgetError
from ._checks import check_delta, check_epsilon
from .noise import SEEDED_LABEL


@dataclass(frozen=True)
class AccountantStep:
    """One run of identical DP-SGD steps, as in Opacus' ``accountant.history`` tuples."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyBudgetError(
                f"noise_multiplier must be a positive finite number, got {self.noise_multiplier!r}."
            )
        if not (0 < self.sample_rate <= 1):
            raise PrivacyBudgetError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}.")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise PrivacyBudgetError(f"steps must be a positive integer, got {self.steps!r}.")

    def as_opacus(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class PrivacyMetadata:
    """What one model cost: ε, δ, training data set ids and, optionally, the accountant history.

    ``epsilon`` may be ``math.inf`` for a model trained without DP (it then dominates any sum).
    ``accountant`` names the Opacus accountant that produced ``epsilon`` ("rdp", "prv", "gdp").
    ``seeded`` is True when the noise (or the sampling) of some mechanism behind the model came from a
    known seed: anyone with the seed can re-run the mechanism, so ε is then **not a privacy guarantee**
    (tests and reproductions only). Every report and card derived from the model says so.
    """

    epsilon: float
    delta: float
    datasets: tuple[str, ...]
    accountant: str | None = None
    history: tuple[AccountantStep, ...] = field(default_factory=tuple)
    seeded: bool = False

    def __post_init__(self) -> None:
        check_epsilon(self.epsilon, allow_zero=True, allow_inf=True)
        check_delta(self.delta)
        if not self.datasets or not all(isinstance(d, str) and d for d in self.datasets):
            raise PrivacyBudgetError(
                "datasets must name at least one training data set id (non-empty strings), "
                f"got {self.datasets!r}."
            )
        object.__setattr__(self, "datasets", tuple(self.datasets))
        object.__setattr__(self, "history", tuple(self.history))
        if not isinstance(self.seeded, bool):
            raise PrivacyBudgetError(f"seeded must be True or False, got {self.seeded!r}.")

    @classmethod
    def from_opacus(
        cls, *, epsilon: float, delta: float, datasets: tuple[str, ...] | list[str], accountant: Any,
        seeded: bool = False,
    ) -> "PrivacyMetadata":
        """Build from an Opacus accountant (``privacy_engine.accountant``) after training."""
        history = tuple(AccountantStep(float(s), float(q), int(n)) for s, q, n in accountant.history)
        return cls(float(epsilon), float(delta), tuple(datasets), accountant.mechanism(), history, seeded)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epsilon": encode_float(self.epsilon),
            "delta": self.delta,
            "datasets": list(self.datasets),
            "accountant": self.accountant,
            "history": [
                {"noise_multiplier": h.noise_multiplier, "sample_rate": h.sample_rate, "steps": h.steps}
                for h in self.history
            ],
            "seeded": self.seeded,
            **({"noise": SEEDED_LABEL} if self.seeded else {}),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PrivacyMetadata":
        try:
            return cls(
                epsilon=decode_float(data["epsilon"]),
                delta=float(data["delta"]),
                datasets=tuple(data["datasets"]),
                accountant=data.get("accountant"),
                history=tuple(AccountantStep(**h) for h in data.get("history") or ()),
                seeded=bool(data.get("seeded", False)),
            )
        except (KeyError, TypeError) as exc:
            raise PrivacyBudgetError(
                f"Privacy metadata is malformed ({exc!r}); expected keys epsilon, delta, datasets "
                "and optionally accountant, history."
            ) from exc


def encode_float(x: float) -> float | str:
    """``x`` for JSON: ``"inf"`` for infinity (JSON has none; the file stays standard-conforming)."""
    return "inf" if math.isinf(x) else x


def decode_float(x: float | str) -> float:
    """The inverse of :func:`encode_float`."""
    return math.inf if x == "inf" else float(x)
