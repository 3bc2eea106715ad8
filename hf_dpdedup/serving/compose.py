"""Composing members from one in-memory copy of the family's blocks, sharing identical tensors.

- :class:`RowMemory` holds the shards the pool's members need, copied once into the process's own
  (64-byte aligned) memory: the family's blocks, resident once.
- :class:`TensorCache` hands out one tensor object per :class:`~.plan.TensorKey`. A block tensor
  whose rows are one ascending run inside one shard is a *view* of the row memory (no copy); any
  other block tensor is gathered once, and extras are read once per distinct content. Entries are
  reference-counted by the resident members that use them and dropped when the last one leaves.
- :func:`compose` points a model's parameters at those shared tensors: a *template* of the same
  architecture (the module tree of an evicted member, or a structural clone of a resident one)
  whose parameter slots are simply re-pointed, or, for a new architecture, a skeleton built
  without weights (:func:`hf_dpdedup.skeleton.empty_model`, as loading builds one). Nothing is ever written into a shared tensor: pool models
  are read-only.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch

from ..blocks import tensor_from_rows
from ..skeleton import check_tensor, missing_weights_error, source_file, unexpected_tensors_error
from ..store.block_store import BlockStore
from .plan import MemberPlan, TensorKey, check_unchanged, read_extras


class RowMemory:
    """The rows of ``store`` that ``rows`` name, loaded once: whole shards in the process's memory."""

    def __init__(self, store: BlockStore, rows: Iterable[int], *, verify: bool = True) -> None:
        self.block_size = store.block_size
        self.dtype = store.dtype
        shards = store.shards_for_rows(np.unique(np.fromiter(rows, dtype=np.int64)))
        self._shards: dict[int, torch.Tensor] = {}
        for shard in shards:  # one shard at a time: the mapped file is dropped after its copy
            mapped = store.read_shards([shard], verify=verify)[shard.first_row]
            self._shards[shard.first_row] = mapped.clone()
            del mapped
        self._starts = np.array(sorted(self._shards), dtype=np.int64)
        self._is_view: dict[tuple[int, ...], bool] = {}
        self.nbytes = sum(t.numel() * t.element_size() for t in self._shards.values())

    def _shard_of(self, ids: np.ndarray) -> np.ndarray:
        return self._starts[np.searchsorted(self._starts, ids, side="right") - 1]

    def is_view(self, rows: tuple[int, ...]) -> bool:
        """True when ``rows`` are one ascending run inside one shard (servable without a copy)."""
        view = self._is_view.get(rows)
        if view is None:
            ids = np.asarray(rows, dtype=np.int64)
            shard_of = self._shard_of(ids)
            view = self._is_view[rows] = bool((shard_of == shard_of[0]).all() and (np.diff(ids) == 1).all())
        return view

    def cost(self, key: TensorKey) -> int:
        """Bytes that serving ``key`` adds: 0 for a view, the gathered (padded) rows (a packed extra:
        its own values) otherwise."""
        if key.kind == "packed":
            return 0 if self.is_view(key.ident[1:]) else key.nbytes
        if key.kind != "rows":
            return key.nbytes
        return 0 if self.is_view(key.ident) else len(key.ident) * self.block_size * self.dtype.itemsize

    def tensor(self, key: TensorKey) -> torch.Tensor:
        """The tensor ``key`` names: a view when its rows are one run, else a gather into new memory
        (a packed extra: its slice of the packed rows, a view or a copy of its own)."""
        if key.kind == "packed":
            offset, rows = key.ident[0], key.ident[1:]
            numel = math.prod(key.shape)
            flat = self._rows(rows).reshape(-1)[offset : offset + numel].view(key.shape)
            return flat if self.is_view(rows) else flat.clone()
        return tensor_from_rows(self._rows(key.ident), key.shape)

    def _rows(self, rows: tuple[int, ...]) -> torch.Tensor:
        """The ``[n, block_size]`` rows: a view of the shard when they are one run, else a gather."""
        ids = np.asarray(rows, dtype=np.int64)
        if self.is_view(rows):
            first = int(self._shard_of(ids[:1])[0])
            local = int(ids[0]) - first
            return self._shards[first][local : local + len(ids)]
        shard_of = self._shard_of(ids)
        out = torch.empty(len(ids), self.block_size, dtype=self.dtype)
        for start in np.unique(shard_of):
            mask = shard_of == start
            src = self._shards[int(start)].index_select(0, torch.from_numpy(ids[mask] - start))
            out.index_copy_(0, torch.from_numpy(np.nonzero(mask)[0]), src)
        return out


@dataclass
class _Entry:
    tensor: torch.Tensor
    nbytes: int  # bytes this entry holds beyond the row memory (0 for views)
    users: set[str] = field(default_factory=set)
    _param: torch.nn.Parameter | None = None

    @property
    def param(self) -> torch.nn.Parameter:
        """One Parameter per entry, so members tied to the same values hold the very same object."""
        if self._param is None:
            self._param = torch.nn.Parameter(self.tensor, requires_grad=False)
        return self._param


class TensorCache:
    """One shared tensor per key, reference-counted by resident members. An entry no resident
    member uses is kept as *idle* (still counted in ``nbytes``) until :meth:`drop_idle` makes
    room, so a member evicted and requested again soon needs no copy. Not thread-safe on its own:
    the pool calls it under its lock."""

    def __init__(self, rows: RowMemory) -> None:
        self.rows = rows
        self._entries: dict[TensorKey, _Entry] = {}
        self._idle: OrderedDict[TensorKey, None] = OrderedDict()  # least recently released first
        self.nbytes = 0  # materialized bytes held (gathers and extras), idle ones included

    def __contains__(self, key: TensorKey) -> bool:
        return key in self._entries

    def missing_bytes(self, plan: MemberPlan) -> int:
        """Bytes composing ``plan`` would add (its distinct keys not held yet)."""
        return sum(self.rows.cost(k) for k in plan.keys if k not in self._entries)

    def own_bytes(self, plan: MemberPlan) -> int:
        """Bytes ``plan`` would need with an empty cache (its worst case)."""
        return sum(self.rows.cost(k) for k in plan.keys)

    def acquire(self, plan: MemberPlan) -> dict[str, _Entry]:
        """The entry of each of ``plan``'s tensors, creating the missing ones; ``plan`` becomes a user."""
        check_unchanged(plan)
        missing_extras = {n: k for n, k in plan.tensors.items() if k.kind == "extra" and k not in self._entries}
        # re-read only what no resident member holds, checked against the digests the plan recorded
        extras = read_extras(plan.path, plan.constitution, missing_extras) if missing_extras else {}
        out: dict[str, _Entry] = {}
        for name, key in plan.tensors.items():
            entry = self._entries.get(key)
            if entry is None:
                tensor = extras[name] if key.kind == "extra" else self.rows.tensor(key)
                entry = self._entries[key] = _Entry(tensor, self.rows.cost(key))
                self.nbytes += entry.nbytes
            elif not entry.users:
                self._idle.pop(key, None)
            entry.users.add(plan.name)
            out[name] = entry
        return out

    def release(self, plan: MemberPlan) -> None:
        """``plan`` leaves: entries no resident member uses any more become idle."""
        for key in plan.keys:
            entry = self._entries.get(key)
            if entry is not None and plan.name in entry.users:
                entry.users.discard(plan.name)
                if not entry.users and entry.nbytes:  # views cost nothing: never worth dropping
                    self._idle[key] = None

    def drop_idle(self, keep: frozenset[TensorKey]) -> bool:
        """Free the least recently released idle entry holding memory (not one in ``keep``)."""
        for key in self._idle:
            if key not in keep:
                del self._idle[key]
                self.nbytes -= self._entries.pop(key).nbytes
                return True
        return False


# --- pointing a model at the shared tensors ---------------------------------------------------------
_Slot = tuple[torch.nn.Module, str, bool]  # module, attribute, is a parameter


def _slots(model: torch.nn.Module) -> dict[str, _Slot]:
    slots = getattr(model, "_serving_slots", None)
    if slots is None:
        slots = {}
        for prefix, module in model.named_modules(remove_duplicate=False):
            dot = f"{prefix}." if prefix else ""
            slots.update({dot + leaf: (module, leaf, True) for leaf in module._parameters})
            slots.update({dot + leaf: (module, leaf, False) for leaf in module._buffers})
        model._serving_slots = slots
    return slots


def clone_structure(template: torch.nn.Module) -> torch.nn.Module:
    """A new module tree shaped like ``template``, for :func:`compose` to re-point.

    Every module object is new, with its own parameter, buffer, submodule and hook dicts; all
    other attributes (config, sizes, non-persistent buffers) are shared, as they are equal for
    members of one architecture. Much cheaper than building a model: no constructor runs."""
    clones: dict[int, torch.nn.Module] = {}

    def clone(module: torch.nn.Module) -> torch.nn.Module:
        if id(module) in clones:  # a module reachable twice stays one module
            return clones[id(module)]
        new = clones[id(module)] = module.__class__.__new__(module.__class__)
        for attr, value in vars(module).items():
            new.__dict__[attr] = copy.copy(value) if isinstance(value, (dict, set)) else value
        new.__dict__["_modules"] = {k: None if m is None else clone(m) for k, m in module._modules.items()}
        return new

    model = clone(template)
    model.__dict__.pop("_serving_slots", None)
    return model


def compose(plan: MemberPlan, entries: dict[str, _Entry], model: torch.nn.Module, *, fresh: bool) -> torch.nn.Module:
    """Point every weight slot of ``model`` at ``entries`` (re-tying aliases); return ``model``.

    ``fresh`` marks a new skeleton: ties the checkpoint omitted are found once, by
    ``tie_weights()``, and remembered on the model for later re-pointing."""
    slots = _slots(model)
    sources = {**{n: n for n in entries}, **plan.aliases, **getattr(model, "_serving_ties", {})}
    for name, source in sources.items():
        if name not in slots:
            raise unexpected_tensors_error(plan.klass, [name], plan.name)
        module, leaf, is_param = slots[name]
        entry = entries[source]
        if fresh:
            check_tensor(name, (module._parameters if is_param else module._buffers).get(leaf), entry.tensor,
                         source=source_file(plan.tensors[source].kind == "extra"), member=plan.name)
        if is_param:
            module._parameters[leaf] = entry.param
        else:
            module._buffers[leaf] = entry.tensor
    if fresh:
        _find_ties(plan, model, slots, sources)
        model.eval()  # a template is in eval mode already
    model.serving_member = plan.name
    return model


def _find_ties(plan: MemberPlan, model: torch.nn.Module, slots: dict[str, _Slot], sources: dict[str, str]) -> None:
    def value(name: str) -> torch.Tensor | None:
        module, leaf, is_param = slots[name]
        return (module._parameters if is_param else module._buffers).get(leaf)

    empty = [n for n in slots if n not in sources and value(n) is not None and value(n).is_meta]
    if empty:
        model.tie_weights()
    ties = {}
    for name in empty:
        tied = next((s for s in sources if value(s) is value(name)), None)
        if tied is None:
            raise missing_weights_error(plan.klass, [name], plan.name)
        ties[name] = sources[tied]
    model._serving_ties = ties


def strip(model: torch.nn.Module) -> None:
    """Drop a model's references to the shared tensors, keeping its module tree for reuse."""
    for module, leaf, is_param in _slots(model).values():
        store = module._parameters if is_param else module._buffers
        # non-persistent buffers (position ids, rotary tables) belong to the architecture: kept
        if is_param or leaf not in module._non_persistent_buffers_set:
            store[leaf] = None
