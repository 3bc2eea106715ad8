"""The privacy ledger: what a (derived) model costs, by the paper's Theorem 4 and, where possible, RDP.

A model's cost is composed from :class:`Charge` s: one per source model whose weights the model
(or the search that built it) *read*, and one per noisy mechanism run on private data whose
output influenced it (SVT sessions, Laplace releases). Rule (Theorem 4, generalised):

1. build the graph whose nodes are the distinct charges (by ``source_id``) and whose edges join
   charges whose data sets overlap (share an id, or a pair declared in ``overlaps``);
2. in each connected component, sequential composition: ε_C = Σ ε_i and δ_C = Σ δ_i;
3. components touch disjoint data, so parallel composition: the model is (max ε_C, max δ_C)-DP.

This *loose* figure is always computed. Where every charge of a component has an RDP curve (an
Opacus history, a known curve, or pure ε-DP), the component's curves are added and converted at
δ_C (or at ``target_delta``) — the *tight* figure. At δ_C both figures are valid (ε, δ_C)
guarantees of the same mechanism, so the reported tight ε is their minimum and never exceeds the
loose one. With a ``target_delta`` below δ_C the two are guarantees at different δ and the tight
one is reported as is (it may then exceed the loose ε, at a smaller δ).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..errors import PrivacyAccountingError
from ._checks import check_delta
from .accounting import epsilon_from_rdp
from .charge import Charge, sum_rounded_up
from .report import ComponentReport, LedgerReport


def distinct_charges(charges: Iterable[Charge]) -> tuple[Charge, ...]:
    """Charges with duplicates (same ``source_id``) removed; conflicting duplicates are an error."""
    seen: dict[str, Charge] = {}
    for charge in charges:
        if not isinstance(charge, Charge):
            raise PrivacyAccountingError(f"Expected a Charge, got {type(charge).__name__}.")
        previous = seen.setdefault(charge.source_id, charge)
        if previous != charge:
            raise PrivacyAccountingError(
                f"Two different charges share source_id {charge.source_id!r}; give every mechanism and "
                "every source model its own id."
            )
    return tuple(seen.values())


def components(charges: Iterable[Charge], *, overlaps: Iterable[tuple[str, str]] = ()) -> list[tuple[Charge, ...]]:
    """Connected components of the "data sets overlap" graph over the distinct charges (union-find)."""
    unique = distinct_charges(charges)
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    for charge in unique:
        for other in charge.datasets[1:]:
            union(charge.datasets[0], other)
    for a, b in overlaps:
        union(a, b)
    groups: dict[str, list[Charge]] = {}
    for charge in unique:
        groups.setdefault(find(charge.datasets[0]), []).append(charge)
    return sorted((tuple(g) for g in groups.values()), key=lambda g: min(d for c in g for d in c.datasets))


def compose_loose(charges: Iterable[Charge], *, overlaps: Iterable[tuple[str, str]] = ()) -> tuple[float, float]:
    """Theorem 4: (max over components of Σε, max over components of Σδ)."""
    report = account(charges, overlaps=overlaps)
    return report.epsilon_loose, report.delta_loose


def compose_tight(
    charges: Iterable[Charge], *, target_delta: float | None = None, overlaps: Iterable[tuple[str, str]] = ()
) -> tuple[float, float] | None:
    """RDP composition per component, max over components; None when some charge has no RDP curve."""
    report = account(charges, target_delta=target_delta, overlaps=overlaps)
    if report.epsilon_tight is None:
        return None
    return report.epsilon_tight, report.delta_tight  # type: ignore[return-value]


def account(
    charges: Iterable[Charge], *, target_delta: float | None = None, overlaps: Iterable[tuple[str, str]] = ()
) -> LedgerReport:
    """Full report: loose and tight figures for every component and for the model."""
    if target_delta is not None:
        target_delta = check_delta(target_delta, name="target_delta", allow_zero=False)
    unique = distinct_charges(charges)
    reports = tuple(_component_report(g, target_delta) for g in components(unique, overlaps=overlaps))
    return LedgerReport(reports, unique, seeded=any(c.seeded for c in unique))


def _component_report(group: tuple[Charge, ...], target_delta: float | None) -> ComponentReport:
    eps_loose = sum_rounded_up(c.epsilon for c in group)
    delta_loose = sum_rounded_up(c.delta for c in group)
    base = dict(
        datasets=tuple(sorted({d for c in group for d in c.datasets})),
        sources=tuple(sorted(c.source_id for c in group)),
        epsilon_loose=eps_loose,
        delta_loose=delta_loose,
    )
    if delta_loose >= 1:
        return ComponentReport(**base, tight_unavailable=f"δ sums to {delta_loose} ≥ 1: no guarantee")
    # A canonical order (by source id) makes the floating-point sum independent of input order.
    ordered = sorted(group, key=lambda c: c.source_id)
    curves = [c.rdp_curve() for c in ordered]
    missing = [c.source_id for c, curve in zip(ordered, curves) if curve is None]
    if missing:
        reason = f"no accountant history or RDP curve for {', '.join(sorted(missing))} (δ > 0 or ε = inf)"
        return ComponentReport(**base, tight_unavailable=reason)
    delta = delta_loose if target_delta is None else target_delta
    if delta == 0:
        # Only pure ε-DP charges and no target δ: pure composition (the sum) is exact at δ = 0.
        return ComponentReport(**base, epsilon_tight=eps_loose, delta_tight=0.0)
    total = np.zeros_like(curves[0])
    for curve in curves:  # left to right, as Opacus sums its history
        total = total + curve
    eps_rdp = epsilon_from_rdp(total, delta=delta)
    # min with the sum is valid only when the sum is a guarantee at a δ no larger than ours.
    eps_tight = min(eps_rdp, eps_loose) if delta_loose <= delta else eps_rdp
    return ComponentReport(**base, epsilon_tight=eps_tight, delta_tight=delta, epsilon_rdp=eps_rdp)
