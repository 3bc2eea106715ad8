"""Search strategies: which planned replacements to keep, with as few validations as possible.

Every strategy walks the same ordered sequence of :class:`~.live.Replacement` (least salient
block first), applies groups of them in place on the live model, asks the validator, and reverts
rejected groups exactly. They stop early when the validator halts (the SVT cut-off). The result is
the set of replacements left applied on the model.

* ``gallop`` (default): walk the cost-ordered sequence in groups that double after an accepted group
  and halve after a rejected one; a rejected group of ``min_group`` is skipped. Rejections happen
  only where the sequence turns bad, which is what the SVT's cut-off counts, and the walk goes past
  an expensive block to the cheap ones behind it (the cost order is an estimate). At most
  ``max_validations`` validations.
* ``greedy``: fixed groups of N (the paper's GreedyN).
* ``binary``: take the first half of what remains; a group that fails is split in two and its
  halves are tried (down to ``min_group``); the right half is only tried when the left half mostly
  passed, because blocks further right are more salient.
* ``halving`` (successive halving): the next group is always half of the current sequence; a success
  moves on to everything that remains, a failure halves the group again.
* ``mcts``: the paper's Monte-Carlo tree search baseline over include/skip decisions per group of g.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from .live import LiveBlocks, Replacement
from .validate import Validator


@dataclass
class SearchResult:
    accepted: list[Replacement] = field(default_factory=list)
    validations: int = 0
    halted: bool = False
    # the values the accepted blocks had before, in acceptance order (what ``confirm`` reverts to)
    undo: list[tuple[int, Any]] = field(default_factory=list, repr=False)
    confirmations: int = 0
    rejected_by_confirmation: int = 0


class _Trial:
    """Applies groups on the live model and keeps or reverts them by the validator's answer."""

    def __init__(self, live: LiveBlocks, validator: Validator, model,
                 progress: Callable[[int], object] | None = None, keep_undo: bool = True) -> None:
        self.live, self.validator, self.model = live, validator, model
        self.progress = progress  # called with 1 after each validation (a progress bar's update)
        self.keep_undo = keep_undo  # the accepted blocks' old values: one model's bytes at worst
        self.result = SearchResult()

    def accept(self, group: list[Replacement], undo: list[tuple[int, Any]]) -> None:
        self.result.accepted.extend(group)
        if self.keep_undo:
            self.result.undo.extend(undo)

    def validate(self) -> bool:
        self.result.validations += 1
        accepted = self.validator.accepts(self.model)
        if self.progress is not None:
            self.progress(1)
        return accepted

    @property
    def halted(self) -> bool:
        return self.validator.halted

    def try_group(self, group: list[Replacement]) -> bool:
        if not group or self.halted:
            return False
        undo = self.live.apply(group)
        if self.validate():
            self.accept(group, undo)
            return True
        self.live.revert(undo)
        return False

    def finish(self) -> SearchResult:
        self.result.halted = self.halted
        return self.result


def gallop(trial: _Trial, sequence: list[Replacement], *, min_group: int = 4, max_validations: int = 25) -> None:
    if min_group < 1 or max_validations < 1:
        raise ValueError(f"gallop needs min_group ≥ 1 and max_validations ≥ 1, got {min_group}, {max_validations}.")
    start, size = 0, min_group
    while start < len(sequence) and not trial.halted and trial.result.validations < max_validations:
        group = sequence[start : start + size]
        if trial.try_group(group):
            start += len(group)
            size *= 2
        elif size <= min_group:
            start += len(group)  # the smallest group failed: leave it, try what follows
        else:
            size = max(min_group, size // 2)


def greedy(trial: _Trial, sequence: list[Replacement], *, n: int = 10) -> None:
    for start in range(0, len(sequence), n):
        if trial.halted:
            return
        trial.try_group(sequence[start : start + n])


def binary(trial: _Trial, sequence: list[Replacement], *, min_group: int = 4) -> None:
    def solve(segment: list[Replacement]) -> int:
        if not segment or trial.halted:
            return 0
        if trial.try_group(segment):
            return len(segment)
        if len(segment) <= min_group:
            return 0
        mid = len(segment) // 2
        kept = solve(segment[:mid])
        if kept > mid // 2:  # the left half mostly passed: the right half is worth a look
            kept += solve(segment[mid:])
        return kept

    remaining = sequence
    while remaining and not trial.halted:
        mid = math.ceil(len(remaining) / 2)
        left, remaining = remaining[:mid], remaining[mid:]
        if solve(left) <= len(left) // 2:
            return  # mostly salient from here on


def halving(trial: _Trial, sequence: list[Replacement], *, min_group: int = 4) -> None:
    current, rest = sequence, []
    while len(current) >= min_group and not trial.halted:
        mid = max(1, len(current) // 2)
        left = current[:mid]
        rest = current[mid:] + rest
        if trial.try_group(left):
            current, rest = rest, []
        elif len(left) == len(current):
            return  # a single replacement failed: it cannot be halved further (min_group=1)
        else:
            current = left


def mcts(
    trial: _Trial, sequence: list[Replacement], *, group: int = 20, episodes: int = 20, seed: int = 0
) -> None:
    """UCT over include/skip per group; each episode validates one candidate set (its reward is the
    share of blocks it replaces if accepted, else 0); the best accepted set is applied at the end."""
    groups = [sequence[i : i + group] for i in range(0, len(sequence), group)]
    rng = random.Random(seed)
    stats: dict[tuple[bool, ...], list[float]] = {}  # prefix -> [visits, total reward]
    best: tuple[float, tuple[bool, ...]] = (0.0, ())
    for _ in range(episodes):
        if trial.halted:
            break
        prefix: tuple[bool, ...] = ()
        while len(prefix) < len(groups) and all(prefix + (c,) in stats for c in (True, False)):
            parent = stats.get(prefix, [1.0, 0.0])[0]
            prefix += (max((True, False), key=lambda c: _uct(stats[prefix + (c,)], parent)),)
        if len(prefix) < len(groups):
            untried = [c for c in (True, False) if prefix + (c,) not in stats]
            prefix += (rng.choice(untried),)
        choice = prefix + tuple(rng.random() < 0.5 for _ in range(len(groups) - len(prefix)))
        chosen = [r for g, take in zip(groups, choice) if take for r in g]
        undo = trial.live.apply(chosen)
        if chosen:
            ok = trial.validate()
        else:
            trial.result.validations += 1
            ok = False
        trial.live.revert(undo)
        reward = len(chosen) / max(1, len(sequence)) if ok else 0.0
        if ok and reward > best[0]:
            best = (reward, choice)
        for depth in range(len(prefix) + 1):  # the root too: its visits drive UCT's exploration term
            node = stats.setdefault(prefix[:depth], [0.0, 0.0])
            node[0] += 1
            node[1] += reward
    chosen = [r for g, take in zip(groups, best[1]) if take for r in g]
    if chosen:  # already validated when it was found
        trial.accept(chosen, trial.live.apply(chosen))


def _uct(node: list[float], parent_visits: float, c: float = 1.4) -> float:
    visits, total = node
    return total / visits + c * math.sqrt(math.log(max(parent_visits, 1.0)) / visits)


STRATEGIES = {"gallop": gallop, "greedy": greedy, "binary": binary, "halving": halving, "mcts": mcts}


def run_search(
    strategy: str,
    model,
    live: LiveBlocks,
    sequence: list[Replacement],
    validator: Validator,
    progress: Callable[[int], object] | None = None,
    keep_undo: bool = True,
    **options,
) -> SearchResult:
    """Run ``strategy`` over ``sequence``; accepted replacements stay applied on ``model``.
    ``progress(1)`` is called after every validation. ``keep_undo=False``: the accepted blocks'
    old values are not kept (``result.undo`` stays empty; :func:`confirm` then cannot run)."""
    try:
        search = STRATEGIES[strategy]
    except KeyError:
        raise ValueError(f"Unknown strategy {strategy!r}; choose one of {sorted(STRATEGIES)}.") from None
    trial = _Trial(live, validator, model, progress, keep_undo)
    search(trial, sequence, **options)
    return trial.finish()


def confirm(model, live: LiveBlocks, result: SearchResult, validator: Validator, *, mode: str = "prefix",
            max_validations: int = 12) -> SearchResult:
    """Check the accepted replacements on data the search did not use and revert what it rejects.

    The search's many validations on one set select replacements that happen to pass on it; a
    second, independent set catches that. One validation when everything holds. Otherwise
    ``mode="prefix"`` keeps the longest prefix (in acceptance order, i.e. cheapest first) that
    ``validator`` accepts, by bisection (about log2(accepted) more validations); ``mode="gallop"``
    walks the accepted replacements with :func:`gallop` on the confirmation data (a rejected one is
    skipped and the walk goes on, at most ``max_validations``), so one bad early replacement does
    not cost every good one behind it — at the price of more selection on the confirmation split.
    Updates and returns ``result``.
    """
    if mode not in ("prefix", "gallop"):
        raise ValueError(f"Unknown confirmation mode {mode!r}; use 'prefix' or 'gallop'.")
    if not result.accepted:
        return result
    if len(result.undo) < len(result.accepted):
        raise ValueError("confirm needs the search's undo values: run the search with keep_undo=True.")
    result.confirmations += 1
    if validator.accepts(model):
        return result
    live.revert(result.undo)  # back to the target as it was before the search
    if mode == "gallop":
        trial = _Trial(live, validator, model)
        gallop(trial, result.accepted, min_group=1, max_validations=max_validations)
        kept, undo = trial.result.accepted, trial.result.undo
        result.confirmations += trial.result.validations
    else:
        kept_n, bad = 0, len(result.accepted)  # prefix ``kept_n`` is applied; prefix ``bad`` was rejected
        while bad - kept_n > 1:
            mid = (kept_n + bad) // 2
            step = live.apply(result.accepted[kept_n:mid])
            result.confirmations += 1
            if validator.accepts(model):
                kept_n = mid
            else:
                live.revert(step)
                bad = mid
        kept, undo = result.accepted[:kept_n], result.undo[:kept_n]
    result.rejected_by_confirmation = len(result.accepted) - len(kept)
    result.accepted, result.undo = list(kept), list(undo)
    return result
