"""Exact discrete Laplace noise from a secure (or, for tests only, seeded) random source.

Why discrete and exact: the textbook sampler ``b·ln(U)`` on floating-point numbers leaks through
its low-order bits and truncated tails (Mironov, CCS 2012), so a released float can break ε-DP.
Every mechanism of this package therefore works on *integers* (private sums of quantised scores)
and adds integer noise drawn exactly from the discrete Laplace distribution

    P(Z = z) ∝ exp(−|z| / b)   for z ∈ ℤ,  b > 0 rational,

with the sampler of Canonne, Kamath & Steinke (NeurIPS 2020, Algorithms 1–2), which uses only
uniform random integers and rational arithmetic: no floating point touches the noise. For an
integer-valued query of sensitivity Δ (an integer), adding Lap_ℤ(Δ/ε) is exactly ε-DP, because
P(z)/P(z + k) ≤ exp(|k|/b) for every integer shift k, the same ratio the continuous proof uses.

The secure source is :class:`random.SystemRandom` (``os.urandom``). ``LaplaceSampler.seeded(seed)``
is for tests only: it sets ``seeded=True``, which every mechanism copies into its results and
charges, and reports print "TEST ONLY: seeded noise".
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

from ..errors import PrivacyBudgetError

SEEDED_LABEL = "TEST ONLY: seeded noise, not a privacy guarantee"


def exact_fraction(x: float | int | Fraction, *, name: str = "scale") -> Fraction:
    """``x`` as an exact rational; a float converts without rounding (every float is a dyadic rational)."""
    if isinstance(x, Fraction):
        return x
    if isinstance(x, float) and not math.isfinite(x):
        raise PrivacyBudgetError(f"{name} must be finite, got {x!r}.")
    return Fraction(x)


class LaplaceSampler:
    """Source of exact discrete Laplace noise.

    >>> LaplaceSampler.secure().seeded          # the default everywhere: os.urandom
    False
    >>> LaplaceSampler.seeded_for_tests(7).discrete_laplace(3) == LaplaceSampler.seeded_for_tests(7).discrete_laplace(3)
    True
    """

    __slots__ = ("_rng", "_seeded")

    def __init__(self, rng: random.Random, *, seeded: bool) -> None:
        self._rng = rng
        self._seeded = seeded

    @classmethod
    def secure(cls) -> "LaplaceSampler":
        """Cryptographically secure source (``random.SystemRandom``, i.e. ``os.urandom``)."""
        return cls(random.SystemRandom(), seeded=False)

    @classmethod
    def seeded_for_tests(cls, seed: int) -> "LaplaceSampler":
        """Reproducible source for tests. Not private: anyone with the seed can remove the noise."""
        return cls(random.Random(seed), seeded=True)

    @property
    def seeded(self) -> bool:
        """True when the noise is reproducible from a seed (test-only mode)."""
        return self._seeded

    def discrete_laplace(self, scale: float | int | Fraction) -> int:
        """One draw of Lap_ℤ(scale): P(z) ∝ exp(−|z|/scale), computed exactly."""
        b = exact_fraction(scale)
        if b <= 0:
            raise PrivacyBudgetError(f"Laplace scale must be > 0, got {scale!r}.")
        # CKS20 Algorithm 2 with scale t/s: t = numerator, s = denominator.
        t, s = b.numerator, b.denominator
        while True:
            u = self._rng.randrange(t)
            if not self._bernoulli_exp(Fraction(u, t)):
                continue
            v = 0
            while self._bernoulli_exp(Fraction(1)):
                v += 1
            y = (u + t * v) // s  # Geometric(1 − exp(−s/t)) on {0, 1, ...}
            negative = self._rng.randrange(2) == 1
            if negative and y == 0:
                continue  # otherwise 0 would be counted twice
            return -y if negative else y

    def _bernoulli(self, p: Fraction) -> bool:
        return self._rng.randrange(p.denominator) < p.numerator

    def _bernoulli_exp(self, gamma: Fraction) -> bool:
        """Bernoulli(exp(−γ)) for rational 0 ≤ γ ≤ 1 (CKS20 Algorithm 1): P(K odd) = exp(−γ)."""
        k = 1
        while self._bernoulli(gamma / k):
            k += 1
        return k % 2 == 1

    def __repr__(self) -> str:
        return f"LaplaceSampler({'seeded: ' + SEEDED_LABEL if self._seeded else 'secure'})"


def discrete_laplace_variance(scale: float | Fraction) -> float:
    """Variance of Lap_ℤ(scale): 2p/(1−p)² with p = exp(−1/scale) (≈ 2·scale² for large scales)."""
    p = math.exp(-1.0 / float(scale))
    return 2.0 * p / (1.0 - p) ** 2
