"""A :class:`Charge`: one privacy cost (a source model's training or one noisy mechanism)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from ..errors import PrivacyAccountingError
from ._checks import check_delta, check_epsilon
from .accounting import DEFAULT_ORDERS, rdp_of_curve, rdp_of_history, rdp_of_pure_dp
from .metadata import AccountantStep, PrivacyMetadata, decode_float, encode_float

KNOWN_KINDS = ("training", "svt", "laplace", "naive_laplace")


@dataclass(frozen=True)
class Charge:
    """One privacy cost: a source model's training, or one noisy mechanism on private data.

    ``source_id`` identifies the mechanism; charges with the same id are the same mechanism and
    count once. ``history`` (Opacus runs) or ``rdp`` ((order, ε(α)) pairs) allow tight accounting;
    a charge with δ = 0 is pure ε-DP and always has an RDP curve.
    """

    source_id: str
    datasets: tuple[str, ...]
    epsilon: float
    delta: float = 0.0
    kind: str = "training"
    history: tuple[AccountantStep, ...] = ()
    rdp: tuple[tuple[float, float], ...] | None = None
    seeded: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.source_id, str) or not self.source_id:
            raise PrivacyAccountingError(f"A charge needs a non-empty source_id, got {self.source_id!r}.")
        datasets = (self.datasets,) if isinstance(self.datasets, str) else tuple(self.datasets)
        if not datasets or not all(isinstance(d, str) and d for d in datasets):
            raise PrivacyAccountingError(
                f"Charge {self.source_id!r} must name the data set id(s) it touches, got {self.datasets!r}."
            )
        object.__setattr__(self, "datasets", tuple(sorted(set(datasets))))
        epsilon = check_epsilon(self.epsilon, name=f"epsilon of {self.source_id}", allow_zero=True, allow_inf=True)
        object.__setattr__(self, "epsilon", epsilon)
        object.__setattr__(self, "delta", check_delta(self.delta, name=f"delta of {self.source_id}"))
        object.__setattr__(self, "history", tuple(self.history))
        if self.rdp is not None:
            object.__setattr__(self, "rdp", tuple((float(a), float(v)) for a, v in self.rdp))
            rdp_of_curve(self.rdp)  # validates
        if not isinstance(self.kind, str) or not self.kind:
            raise PrivacyAccountingError(f"Charge {self.source_id!r} needs a kind such as {KNOWN_KINDS}.")

    @classmethod
    def from_metadata(cls, source_id: str, metadata: PrivacyMetadata) -> "Charge":
        """The training charge of a source model, from its :class:`PrivacyMetadata`."""
        return cls(source_id, metadata.datasets, metadata.epsilon, metadata.delta, "training", metadata.history,
                   seeded=metadata.seeded)

    def rdp_curve(self, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray | None:
        """The best RDP curve this charge supports (elementwise min of all valid ones), or None."""
        curves = []
        if self.history:
            curves.append(rdp_of_history(self.history, orders))
        if self.rdp is not None:
            curves.append(rdp_of_curve(self.rdp, orders))
        if self.delta == 0 and math.isfinite(self.epsilon):
            curves.append(rdp_of_pure_dp(self.epsilon, orders))
        return np.minimum.reduce(curves) if curves else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_id": self.source_id,
            "datasets": list(self.datasets),
            "epsilon": encode_float(self.epsilon),
            "delta": self.delta,
            "kind": self.kind,
            "history": [
                {"noise_multiplier": h.noise_multiplier, "sample_rate": h.sample_rate, "steps": h.steps}
                for h in self.history
            ],
            "rdp": None if self.rdp is None else [list(p) for p in self.rdp],
            "seeded": self.seeded,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Charge":
        try:
            return cls(
                source_id=data["source_id"],
                datasets=tuple(data["datasets"]),
                epsilon=decode_float(data["epsilon"]),
                delta=float(data.get("delta", 0.0)),
                kind=data.get("kind", "training"),
                history=tuple(AccountantStep(**h) for h in data.get("history") or ()),
                rdp=None if data.get("rdp") is None else tuple(tuple(p) for p in data["rdp"]),
                seeded=bool(data.get("seeded", False)),
            )
        except (KeyError, TypeError) as exc:
            raise PrivacyAccountingError(f"Malformed charge {data!r} ({exc!r}).") from exc


def sum_rounded_up(values: Iterable[float]) -> float:
    """Σ values as a float never below the exact real sum (the sum itself is exact, then rounded up)."""
    values = list(values)
    if any(math.isinf(v) for v in values):
        return math.inf
    exact = sum((Fraction(v) for v in values), Fraction(0))
    result = float(exact)
    return math.nextafter(result, math.inf) if Fraction(result) < exact else result
