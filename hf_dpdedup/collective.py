"""Process coordination, on the ground floor: which processes evaluate one model together.

A :class:`Collective` is the team of processes that hold the same model (``hf_dpdedup.distributed``
builds them over ``torch.distributed``); :data:`SINGLE_PROCESS` is the one-process team everything
uses by default. Code that may run on a team — public evaluations (:mod:`.dedup.validate`), the
private mechanisms (:mod:`.privacy`) — asks :func:`current_collective` and shards its work with
:func:`shard_range`; :func:`collective_scope` sets the team for a block. Nothing here knows about
models, privacy or the store, so every layer can import it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Protocol, TypeVar

T = TypeVar("T")


class Collective(Protocol):
    """The processes that evaluate one model together (see ``hf_dpdedup.distributed``)."""

    rank: int  # this process' position among them
    size: int  # how many they are

    @property
    def is_main(self) -> bool: ...

    def sum(self, values: list[int] | list[float]) -> list:
        """Element-wise sum over the processes (exact for integers; floats: one non-zero addend each)."""

    def from_main(self, compute: Callable[[], T]) -> T:
        """``compute()`` on the main process only; every process returns its result."""


class _SingleProcess:
    rank, size, is_main = 0, 1, True

    def sum(self, values):
        return list(values)

    def from_main(self, compute):
        return compute()


SINGLE_PROCESS: Collective = _SingleProcess()
_ACTIVE: ContextVar[Collective] = ContextVar("hf_dpdedup_collective", default=SINGLE_PROCESS)


def current_collective() -> Collective:
    """The team the current block runs on (:data:`SINGLE_PROCESS` outside any :func:`collective_scope`)."""
    return _ACTIVE.get()


@contextmanager
def collective_scope(collective: Collective) -> Iterator[Collective]:
    """Make the mechanisms and public evaluations in this block run across ``collective``."""
    token = _ACTIVE.set(collective)
    try:
        yield collective
    finally:
        _ACTIVE.reset(token)


def shard_range(n_items: int, rank: int, size: int) -> range:
    """Contiguous shard ``rank`` of ``size`` over ``range(n_items)``; the first ``n_items % size``
    shards get one more item. The shards partition the range exactly (no padding, no repeats)."""
    per, extra = divmod(n_items, size)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (1 if rank < extra else 0))
