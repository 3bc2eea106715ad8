"""Rényi-DP curves and their conversion to (ε, δ), on top of Opacus' own analysis code.

Every curve is a vector of RDP guarantees ε(α) at the orders :data:`DEFAULT_ORDERS` (Opacus'
``RDPAccountant.DEFAULT_ALPHAS``, so that our figures equal Opacus' for the same history). RDP
composes by adding curves order by order (Mironov 2017, Prop. 1); the sum converts to (ε, δ) with
Opacus' ``get_privacy_spent`` (Balle et al. 2020, Thm. 21).

Sources of curves:

* an Opacus history of DP-SGD runs ``(σ, q, steps)`` → ``compute_rdp`` (sampled Gaussian);
* a pure ε-DP mechanism (SVT, a Laplace release) → ``min(ε, α·ε²/2)``: ε-DP implies (α, ε)-RDP
  because the Rényi divergence of any order is at most the max divergence, and ε-DP implies
  ε²/2-zCDP (Bun & Steinke 2016, Prop. 3.3), i.e. (α, α·ε²/2)-RDP for every α > 1;
* a known curve given at arbitrary orders → at each of our orders we take the value at the
  smallest given order ≥ α, an upper bound because ε(α) is non-decreasing in α (van Erven &
  Harremoës 2014, Thm. 3); orders beyond the largest given one get ∞ (no claim).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Iterable, Sequence

import numpy as np

from ._checks import check_delta, check_epsilon
from .metadata import AccountantStep

# Opacus' RDPAccountant.DEFAULT_ALPHAS (a test checks they stay equal); copied so that importing
# this module does not import opacus (and torch) until a curve is actually computed.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(12, 64)])


def _opacus_rdp():  # noqa: ANN202 - lazy import, see DEFAULT_ORDERS
    from opacus.accountants.analysis import rdp

    return rdp


def rdp_of_history(history: Iterable[AccountantStep], orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP curve of a sequence of DP-SGD runs (sum of Opacus' sampled-Gaussian curves)."""
    total = np.zeros(len(orders))
    for step in history:
        # Same arithmetic as Opacus' compute_rdp (one-step curve × steps), with the one-step curve cached.
        total = total + _one_step_rdp(step.noise_multiplier, step.sample_rate, tuple(orders)) * step.steps
    return total


@functools.lru_cache(maxsize=256)
def _one_step_rdp(noise_multiplier: float, sample_rate: float, orders: tuple[float, ...]) -> np.ndarray:
    curve = _opacus_rdp().compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders))
    curve.setflags(write=False)
    return curve


def rdp_of_pure_dp(epsilon: float, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP curve implied by pure ε-DP: ``min(ε, α·ε²/2)`` at each order α."""
    eps = check_epsilon(epsilon, allow_zero=True)
    alphas = np.asarray(orders, dtype=float)
    return np.minimum(eps, alphas * eps * eps / 2.0)


def rdp_of_curve(points: Iterable[tuple[float, float]], orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """Upper bound at ``orders`` of an RDP curve known at the orders of ``points`` ((α, ε(α)) pairs)."""
    known = sorted((float(a), float(v)) for a, v in points)
    if not known or any(a <= 1 or math.isnan(v) or v < 0 for a, v in known):
        raise ValueError(f"An RDP curve needs (order > 1, value ≥ 0) pairs, got {known!r}.")
    out = np.full(len(orders), math.inf)
    for i, alpha in enumerate(orders):
        above = [v for a, v in known if a >= alpha]
        if above:
            out[i] = above[0]
    return out


def epsilon_from_rdp(rdp: np.ndarray, *, delta: float, orders: Sequence[float] = DEFAULT_ORDERS) -> float:
    """Smallest ε over ``orders`` such that the RDP curve implies (ε, δ)-DP (Opacus' conversion)."""
    delta = check_delta(delta, allow_zero=False)
    rdp = np.asarray(rdp, dtype=float)
    if np.isinf(rdp).all():
        return math.inf
    with warnings.catch_warnings():
        # Opacus warns when the optimum is at the edge of the order grid; the figure is still valid.
        warnings.simplefilter("ignore")
        eps, _ = _opacus_rdp().get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    # A negative ε can come out for δ close to 1; 0 is then a (weaker, still valid) guarantee.
    return max(0.0, float(eps))


def opacus_epsilon(history: Iterable[AccountantStep], *, delta: float) -> float:
    """ε that Opacus' own ``RDPAccountant`` reports for ``history`` (the reference our ledger must match)."""
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [step.as_opacus() for step in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta=delta))
