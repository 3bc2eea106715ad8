"""Ledger results: per-component and per-model figures, serialisable into the model card."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import PrivacyAccountingError
from .charge import Charge
from .metadata import PrivacyMetadata, encode_float
from .noise import SEEDED_LABEL


@dataclass(frozen=True)
class ComponentReport:
    """One connected component of the overlap graph: its data sets, sources and figures."""

    datasets: tuple[str, ...]
    sources: tuple[str, ...]
    epsilon_loose: float
    delta_loose: float
    epsilon_tight: float | None = None
    delta_tight: float | None = None
    epsilon_rdp: float | None = None  # the raw RDP conversion, before the min with the loose figure
    tight_unavailable: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "datasets": list(self.datasets),
            "sources": list(self.sources),
            "loose": {"epsilon": encode_float(self.epsilon_loose), "delta": self.delta_loose},
            "tight": None
            if self.epsilon_tight is None
            else {"epsilon": encode_float(self.epsilon_tight), "delta": self.delta_tight},
            "epsilon_rdp": None if self.epsilon_rdp is None else encode_float(self.epsilon_rdp),
            "tight_unavailable": self.tight_unavailable,
        }


@dataclass(frozen=True)
class LedgerReport:
    """A model's privacy cost: loose (Theorem 4) and tight (RDP) figures, per component and overall."""

    components: tuple[ComponentReport, ...]
    charges: tuple[Charge, ...] = field(repr=False)
    seeded: bool = False

    @property
    def epsilon_loose(self) -> float:
        return max((c.epsilon_loose for c in self.components), default=0.0)

    @property
    def delta_loose(self) -> float:
        return max((c.delta_loose for c in self.components), default=0.0)

    @property
    def tight_unavailable(self) -> str | None:
        reasons = [c.tight_unavailable for c in self.components if c.epsilon_tight is None]
        return "; ".join(r for r in reasons if r) or None

    @property
    def epsilon_tight(self) -> float | None:
        if any(c.epsilon_tight is None for c in self.components):
            return None
        return max((c.epsilon_tight for c in self.components), default=0.0)  # type: ignore[type-var]

    @property
    def delta_tight(self) -> float | None:
        if any(c.delta_tight is None for c in self.components):
            return None
        return max((c.delta_tight for c in self.components), default=0.0)  # type: ignore[type-var]

    @property
    def epsilon(self) -> float:
        """The headline ε: tight where every component has it, else loose (never a mix)."""
        tight = self.epsilon_tight
        return self.epsilon_loose if tight is None else tight

    @property
    def delta(self) -> float:
        tight = self.delta_tight
        return self.delta_loose if tight is None else tight

    @property
    def datasets(self) -> tuple[str, ...]:
        return tuple(sorted({d for c in self.components for d in c.datasets}))

    def to_metadata(self) -> PrivacyMetadata:
        """Metadata for the derived model (headline ε, δ; no history: it is a composition)."""
        if not self.datasets:
            raise PrivacyAccountingError("An empty ledger describes no private data set; charge the sources first.")
        return PrivacyMetadata(self.epsilon, self.delta, self.datasets, accountant="hf_dpdedup-ledger",
                               seeded=self.seeded)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epsilon": encode_float(self.epsilon),
            "delta": self.delta,
            "basis": "loose" if self.epsilon_tight is None else "tight",
            "loose": {"epsilon": encode_float(self.epsilon_loose), "delta": self.delta_loose},
            "tight": None
            if self.epsilon_tight is None
            else {"epsilon": encode_float(self.epsilon_tight), "delta": self.delta_tight},
            "tight_unavailable": self.tight_unavailable,
            "components": [c.to_dict() for c in self.components],
            "charges": [c.to_dict() for c in self.charges],
            "noise": SEEDED_LABEL if self.seeded else "secure",
            "rule": "Theorem 4: per connected component of the data-set overlap graph, sum over distinct "
            "sources; max over components. Tight: RDP composition (Opacus), min with the sum at equal delta.",
        }
