"""Argument checks shared by the privacy modules; each error says what to pass instead."""

from __future__ import annotations

import math

from ..errors import PrivacyBudgetError


def check_epsilon(epsilon: float, *, name: str = "epsilon", allow_zero: bool = False, allow_inf: bool = False) -> float:
    """A finite ε > 0 (≥ 0 with ``allow_zero``; +inf allowed with ``allow_inf``), as a float."""
    try:
        value = float(epsilon)
    except (TypeError, ValueError):
        raise PrivacyBudgetError(f"{name} must be a number > 0, got {epsilon!r}.") from None
    too_small = value < 0 or (value == 0 and not allow_zero)
    if math.isnan(value) or too_small or (math.isinf(value) and not allow_inf):
        allowed = ("a number ≥ 0" if allow_zero else "a number > 0") + (
            " (inf for a non-private model)" if allow_inf else ", finite"
        )
        raise PrivacyBudgetError(f"{name} must be {allowed}, got {epsilon!r}.")
    return value


def check_delta(delta: float, *, name: str = "delta", allow_zero: bool = True) -> float:
    """A δ in [0, 1) (or (0, 1) when ``allow_zero`` is False), as a float."""
    try:
        value = float(delta)
    except (TypeError, ValueError):
        raise PrivacyBudgetError(f"{name} must be a number in [0, 1), got {delta!r}.") from None
    low_ok = value > 0 or (allow_zero and value == 0)
    if math.isnan(value) or not low_ok or value >= 1:
        interval = "[0, 1)" if allow_zero else "(0, 1), e.g. 1e-5"
        raise PrivacyBudgetError(f"{name} must be in {interval}, got {delta!r}.")
    return value


def check_cutoff(cutoff: int) -> int:
    """The SVT cut-off c: a positive integer."""
    if isinstance(cutoff, bool) or not isinstance(cutoff, int) or cutoff < 1:
        raise PrivacyBudgetError(
            f"cutoff c must be an integer ≥ 1 (how many 'too big a drop' answers SVT may give), got {cutoff!r}."
        )
    return cutoff


def check_unit_interval(value: float, *, name: str) -> float:
    """A public utility figure in [0, 1] (an allowed drop, a floor)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise PrivacyBudgetError(f"{name} must be a number in [0, 1], got {value!r}.") from None
    if not (0.0 <= x <= 1.0):
        raise PrivacyBudgetError(f"{name} must be in [0, 1] (a utility is a mean of scores in [0, 1]), got {value!r}.")
    return x
