"""``ServingPool``: many members of one family in memory at the cost of their unique tensors.

The family's blocks are loaded once (:class:`~.compose.RowMemory`); a member is composed on request
by pointing a model's parameters at shared tensors (views of the blocks, or gathers and extras
shared by every member with the same values). Resident members are kept in LRU order under a memory
budget that counts *unique* bytes: the block memory plus every materialized tensor once (tensors
of evicted members are kept while there is room, and freed first when room is needed). A member
that must be composed takes the module tree of the member it evicts (or of an earlier evicted one),
or a structural clone of a resident member of the same architecture, and only re-points its
parameters; a model is constructed only for an architecture the pool has not served yet.

Thread safety: bookkeeping and composition run under one lock; inference runs outside it. A
resident member's model is re-pointed only after it was evicted, and only members with no request
in flight are evicted, so a request never sees another member's weights. Pool models are
read-only: never train them or write into their tensors (tensors are shared between members).

Example:
    >>> pool = ServingPool("family", budget_models=2)
    >>> logits = pool.infer("minilm-sst2-eps4", **tokenizer("great film", return_tensors="pt")).logits
    >>> with pool.use("minilm-sst2-eps8") as model:   # the model is valid inside the block only
    ...     out = model(**batch)
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter, OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from ..errors import ServingBudgetError, ServingTimeoutError, UnknownMemberError
from ..skeleton import empty_model
from ..store.family import FamilyStore
from .compose import RowMemory, TensorCache, clone_structure, compose, strip
from .plan import MemberPlan, read_plan


@dataclass
class _Resident:
    plan: MemberPlan
    model: torch.nn.Module
    in_flight: int = 0


class ServingPool:
    """Serve inference for any member of a family under a memory budget.

    Args:
        family: a family folder (or an open :class:`~hf_dpdedup.store.FamilyStore`).
        budget_bytes: the memory budget in bytes (unique bytes: block memory + materialized tensors).
        budget_models: the budget as a number of full models (the family's largest member).
            Give at most one of the two; with neither, memory is unbounded.
        max_models: at most this many resident members, whatever their bytes (optional).
        members: serve only these members (default: all of the family's members).
        verify: sha256-check every file read when the pool opens.
        wait_timeout: seconds a request waits for memory while every resident member is busy.
    """

    def __init__(
        self,
        family: str | os.PathLike | FamilyStore,
        *,
        budget_bytes: int | None = None,
        budget_models: float | None = None,
        max_models: int | None = None,
        members: Sequence[str] | None = None,
        verify: bool = True,
        wait_timeout: float = 60.0,
    ) -> None:
        family = family if isinstance(family, FamilyStore) else FamilyStore.open(family)
        self.family = family
        known = family.members()
        names = list(members) if members is not None else known
        for name in names:
            if name not in known:
                raise UnknownMemberError(_unknown(name, known))
        self._plans = {n: read_plan(n, family.member_path(n), verify=verify) for n in names}
        self._rows = RowMemory(family.blocks, (r for p in self._plans.values() for r in p.rows), verify=verify)
        self._cache = TensorCache(self._rows)
        self.full_model_bytes = max((p.full_bytes for p in self._plans.values()), default=0)
        self.budget_bytes = _budget(budget_bytes, budget_models, self.full_model_bytes)
        self.max_models = max_models
        self.wait_timeout = wait_timeout
        self._check_budget()
        self._resident: OrderedDict[str, _Resident] = OrderedDict()
        self._spares: dict[str, list[torch.nn.Module]] = {}  # signature -> stripped module trees
        self._cond = threading.Condition()
        self._stats: Counter[str] = Counter()
        self._switch_seconds = 0.0
        self._peak = self._used()

    # --- public ------------------------------------------------------------------------------------
    @property
    def members(self) -> list[str]:
        """The member ids this pool serves."""
        return list(self._plans)

    def plan(self, member: str) -> MemberPlan:
        """What the pool knows about ``member`` (model class, config, tensor keys, folder)."""
        plan = self._plans.get(member) if isinstance(member, str) else None
        if plan is None:
            raise UnknownMemberError(_unknown(member, list(self._plans)))
        return plan

    @contextmanager
    def use(self, member: str) -> Iterator[torch.nn.Module]:
        """The member's model for the duration of the block (composed first if not resident).

        Use it inside ``torch.inference_mode()`` and only inside the block: after it, the pool may
        re-point the same module tree to another member."""
        model = self._acquire(member)
        try:
            yield model
        finally:
            self._release(member)

    def infer(self, member: str, /, **inputs: Any) -> Any:
        """Run the member's model on ``inputs`` (keyword tensors) in inference mode."""
        with self.use(member) as model, torch.inference_mode():
            return model(**inputs)

    def resident(self) -> list[str]:
        """Resident members, least recently used first."""
        with self._cond:
            return list(self._resident)

    def memory(self) -> dict[str, float]:
        """Unique bytes held: block memory, materialized tensors, their sum, the budget, the peak."""
        with self._cond:
            return {
                "block_bytes": self._rows.nbytes,
                "materialized_bytes": self._cache.nbytes,
                "used_bytes": self._used(),
                "peak_bytes": self._peak,
                "budget_bytes": self.budget_bytes,
                "resident": len(self._resident),
            }

    def stats(self) -> dict[str, float]:
        """Counters: hits, compositions (``switches``), evictions, how switches got their module
        (``reused_template``: an evicted member's; ``cloned_template``: a structural clone of a
        resident member's; ``built_model``: a new architecture), waits for memory, and
        ``switch_seconds``."""
        with self._cond:
            return {**self._stats, "switch_seconds": self._switch_seconds}

    # --- acquiring and releasing -------------------------------------------------------------------
    def _acquire(self, member: str) -> torch.nn.Module:
        plan = self.plan(member)
        deadline = time.monotonic() + self.wait_timeout
        with self._cond:
            while True:
                resident = self._resident.get(member)
                if resident is not None:
                    self._resident.move_to_end(member)
                    resident.in_flight += 1
                    self._stats["hits"] += 1
                    return resident.model
                if self._make_room(plan):
                    break
                self._stats["waits"] += 1
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ServingTimeoutError(
                        f"No memory for member {member!r} within {self.wait_timeout:g}s: every resident "
                        "member stayed busy. Raise the budget, lower concurrency, or raise wait_timeout."
                    )
                self._cond.wait(remaining)
            start = time.perf_counter()
            try:
                model = self._compose(plan)
            except BaseException:
                self._cache.release(plan)
                raise
            self._switch_seconds += time.perf_counter() - start
            self._resident[member] = _Resident(plan, model, in_flight=1)
            self._stats["switches"] += 1
            self._peak = max(self._peak, self._used())
            return model

    def _release(self, member: str) -> None:
        with self._cond:
            self._resident[member].in_flight -= 1
            self._cond.notify_all()

    def _make_room(self, plan: MemberPlan) -> bool:
        """Free idle tensors, then evict idle members (LRU first), until ``plan`` fits; False if busy
        members are in the way."""
        while True:
            too_big = self._used() + self._cache.missing_bytes(plan) > self.budget_bytes
            if too_big and self._cache.drop_idle(keep=plan.keys):
                continue
            if not too_big and (self.max_models is None or len(self._resident) < self.max_models):
                return True
            victim = next((name for name, r in self._resident.items() if r.in_flight == 0), None)
            if victim is None:
                return False
            evicted = self._resident.pop(victim)
            self._cache.release(evicted.plan)
            strip(evicted.model)
            self._spares.setdefault(evicted.plan.signature, []).append(evicted.model)
            self._stats["evictions"] += 1

    def _compose(self, plan: MemberPlan) -> torch.nn.Module:
        entries = self._cache.acquire(plan)
        spares = self._spares.get(plan.signature)
        if spares:
            self._stats["reused_template"] += 1
            return compose(plan, entries, spares.pop(), fresh=False)
        twin = next((r.model for r in self._resident.values() if r.plan.signature == plan.signature), None)
        if twin is not None:  # cloning reads the twin's module tree only: safe while it serves
            self._stats["cloned_template"] += 1
            return compose(plan, entries, clone_structure(twin), fresh=False)
        self._stats["built_model"] += 1
        return compose(plan, entries, empty_model(plan.klass, plan.config, self._rows.dtype), fresh=True)

    # --- budget ------------------------------------------------------------------------------------
    def _used(self) -> int:
        return self._rows.nbytes + self._cache.nbytes

    def _check_budget(self) -> None:
        worst = max((self._cache.own_bytes(p) for p in self._plans.values()), default=0)
        if self._rows.nbytes + worst > self.budget_bytes:
            raise ServingBudgetError(
                f"A budget of {self.budget_bytes:,.0f} bytes cannot hold the family's blocks "
                f"({self._rows.nbytes:,} bytes, loaded once) plus the largest member's own tensors "
                f"({worst:,} bytes). Give at least {self._rows.nbytes + worst:,} bytes, or serve fewer "
                "members (members=...)."
            )
        if self.max_models is not None and self.max_models < 1:
            raise ServingBudgetError(f"max_models must be at least 1, got {self.max_models}.")


def _budget(budget_bytes: int | None, budget_models: float | None, full_model_bytes: int) -> float:
    if budget_bytes is not None and budget_models is not None:
        raise ServingBudgetError(
            "Give the budget either in bytes (budget_bytes=) or in models (budget_models=), not both."
        )
    if budget_models is not None:
        return budget_models * full_model_bytes
    return math.inf if budget_bytes is None else budget_bytes


def _unknown(member: object, known: list[str]) -> str:
    return f"Unknown member id {member!r}; this pool serves {known[:10]}{' ...' if len(known) > 10 else ''}."
