"""Zero-copy gathers: a tensor whose rows are scattered over shard files, as one range of memory.

A member that shares blocks with other members names rows in several shards, in no single run, so
its tensors cannot be views of one mapped shard. Copying them costs a memory copy of the member
(the one thing that made a scattered member load slower than transformers maps a file). Where rows
are whole pages in the file, the kernel can do the gather instead: reserve an address range the
size of the tensor and map each run of rows over it from its shard file (``mmap`` with
``MAP_FIXED``, private, copy-on-write). The tensor is then one contiguous, page-aligned buffer
whose pages are the shards' page-cache pages: nothing is copied, nothing is read until used, two
members sharing a row share its memory, and writing to the tensor copies only the pages written
(the files never change).

Used only where it is safe and cheap, otherwise the caller copies as before:
- POSIX with a C library ``mmap`` (Linux, macOS); not Windows;
- rows a whole number of pages and the shard's data page-aligned in its file (shards are written
  so when their rows are whole pages, see :func:`.block_store.data_alignment`);
- within a budget of memory mappings: every run is one mapping, and a process has a limited
  number (``vm.max_map_count``, 65,530 by default on Linux); a load takes at most a quarter of what
  is left, so other code in the process can still map memory;
- the shard file is the very version that was verified (the caller opens it and checks its
  identity against what this process hashed);
- not switched off: ``HF_DPDEDUP_MAP_ROWS=0`` in the environment makes loads copy scattered rows
  (for file systems where mapping files is slow or unreliable, e.g. some network mounts).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10  # the same value on Linux and macOS
_DEFAULT_MAP_LIMIT = 65530
_MAX_MAP_COUNT = Path("/proc/sys/vm/max_map_count")
_SELF_MAPS = Path("/proc/self/maps")
SWITCH = "HF_DPDEDUP_MAP_ROWS"


def _libc_mmap():
    if os.name != "posix" or not sys.platform.startswith(("linux", "darwin")):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.mmap
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_void_p
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    return fn


_mmap = _libc_mmap()


def available() -> bool:
    """Whether this platform can map file pages into a reserved range (``MAP_FIXED``)."""
    return _mmap is not None


@dataclass(frozen=True)
class RowFile:
    """An open shard file whose rows can be mapped: ``offset`` is the file offset of its row 0."""

    fd: int
    offset: int


# one run of consecutive rows: (shard key, first row within the shard, number of rows)
Run = tuple[int, int, int]


def mappable(offset: int, row_bytes: int) -> bool:
    """Rows of ``row_bytes`` starting at file ``offset`` are whole, aligned pages."""
    return row_bytes > 0 and row_bytes % PAGE == 0 and offset % PAGE == 0


def _map_limit() -> int:
    try:
        return int(_MAX_MAP_COUNT.read_text())
    except (OSError, ValueError):
        return _DEFAULT_MAP_LIMIT


def _maps_in_use() -> int:
    try:
        with open(_SELF_MAPS, "rb") as fh:
            return fh.read().count(b"\n")
    except OSError:
        return 0


class RowMapper:
    """Maps runs of rows from open shard files into fresh tensors, within a mapping budget.

    One mapper serves one load: it is built with the shard files the load opened and the budget
    left in the process at that moment; :meth:`gather` returns ``None`` whenever it cannot map (the
    caller then copies), never a partial tensor."""

    def __init__(self, files: dict[int, RowFile], block_size: int, dtype: torch.dtype) -> None:
        self.files = files
        self.block_size = block_size
        self.dtype = dtype
        self.row_bytes = block_size * dtype.itemsize
        self.wanted = bool(files) and available() and os.environ.get(SWITCH, "1") != "0"
        self._budget: int | None = None  # read on the first gather: a load of views never needs it

    @property
    def budget(self) -> int:
        """Mappings this load may still make."""
        if self._budget is None:
            self._budget = max(0, (_map_limit() - _maps_in_use()) // 4) if self.wanted else 0
        return self._budget

    @budget.setter
    def budget(self, value: int) -> None:
        self._budget = value

    def gather(self, runs: Sequence[Run], n_rows: int) -> torch.Tensor | None:
        """A ``[n_rows, block_size]`` tensor of the runs' rows in order, or ``None``."""
        if len(runs) + 1 > self.budget or any(key not in self.files for key, _, _ in runs):
            return None
        region = mmap.mmap(-1, n_rows * self.row_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        anchor = ctypes.c_char.from_buffer(region)
        base = ctypes.addressof(anchor)
        del anchor  # release the export: only the address is needed
        at = 0
        for key, first, count in runs:
            file = self.files[key]
            length = count * self.row_bytes
            got = _mmap(base + at, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | _MAP_FIXED,
                        file.fd, file.offset + first * self.row_bytes)
            if got != base + at:  # MAP_FAILED (ENOMEM: out of mappings, ...): give the range back, copy
                region.close()
                self.budget = 0 if ctypes.get_errno() == errno.ENOMEM else self.budget
                return None
            at += length
        self.budget -= len(runs) + 1
        # the tensor holds the region: unmapping it (when the tensor is freed) drops every run
        return torch.frombuffer(region, dtype=self.dtype, count=n_rows * self.block_size).view(n_rows, self.block_size)
