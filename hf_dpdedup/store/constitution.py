"""``dedup_constitution.json``: how one member model is rebuilt from a block store.

It names the block store (its id, and where to find it: a relative path for local folders, or a
Hub repo id with a *pinned* commit sha), the block size and dtype, and for every block tensor its
shape and the list of store rows that hold its blocks, in order. Extras (small tensors) live in the
member's ``extras.safetensors`` whose sha256 is recorded here; ``aliases`` restores tied weights.
``privacy`` and ``dedup`` carry the model's privacy metadata and the deduplication record: typed,
versioned records (:mod:`.records`).

A member that is a peft adapter on a base model (a ``PeftModel``) has an ``adapter`` record
(:class:`AdapterRecord`): the adapter config exactly as peft writes ``adapter_config.json``, the
peft class, and the base model's class and Hub id / path; its ``tensors`` are the ``PeftModel``'s
whole state dict (base weights included, so the base rows are shared by content addressing),
``architecture`` is the *base* class and the member folder's ``config.json`` is the base's config.
Such a constitution has format ``hf_dpdedup/2``, so a reader that predates adapters refuses it with
its "upgrade hf_dpdedup" error instead of rebuilding a bare base model.

A tensor's ``rows`` list writes each run of at least :data:`MIN_RUN` consecutive row ids as a pair
``[first, count]`` (``[0, 1, 2, 3, 9]`` is written ``[[0, 4], 9]``): a member whose rows are fresh,
or an adapter member that names every row of its base, lists them in a few pairs instead of one
number per block.

Small floating extras of the block dtype (biases, norms) are *packed*
(:func:`hf_dpdedup.blocks.pack_extras`): their values are the block tensor ``PACKED_EXTRAS`` of
``tensors`` (rows like any other, so equal ones are shared between members), and ``packed_extras``
lists each one's name, shape and offset in it. ``extras.safetensors`` keeps the others.

A constitution with a run or packed extras is written in format ``hf_dpdedup/4`` (adapter member or
not), so a reader that predates them refuses it with its "upgrade" error; one without keeps format 1
or 2. Format 4 is format 3 (still read) without what the rest of the file implies: a tensor entry is
``{"name", "shape", "rows"}`` (its dtype is the constitution's, its numel its shape's product), a
packed extra ``{"name", "shape"}`` (they tile their rows in order), and the names' common prefix up
to a ``.`` (a peft member's ``base_model.model.``) is written once as ``name_prefix``: every tensor,
packed extra, extra and alias name in the file is written without it (the reserved
``PACKED_EXTRAS`` never has it). In memory names are always whole.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..blocks import BLOCK_DTYPES, PACKED_EXTRAS, PackedTensor, check_block_size
from ..errors import BlockLayoutError, ConstitutionError
from ..privacy.metadata import PrivacyMetadata
from .format import (
    ADAPTER_MEMBER_FORMAT, COMPACT_MEMBER_FORMAT, EXTRAS_FILE, FORMAT, LEAN_MEMBER_FORMAT, RESAVE, check_format,
    unknown_keys,
)
from .records import DedupRecord, privacy_from_dict, privacy_to_dict

_KEYS = ("format", "kind", "name", "architecture", "block_store", "block_size", "dtype", "name_prefix", "tensors",
         "packed_extras", "extras", "aliases", "privacy", "dedup", "adapter")
#: the formats whose rows may hold runs and which may pack extras (and always name their adapter record)
_COMPACT = (COMPACT_MEMBER_FORMAT, LEAN_MEMBER_FORMAT)
#: the shortest run of consecutive row ids written as ``[first, count]`` (two ids are as short plain)
MIN_RUN = 3
_ADAPTER_KEYS = ("library", "peft_type", "task_type", "peft_class", "adapter_name", "base_model",
                 "base_model_class", "config")


@dataclass(frozen=True)
class StoreRef:
    """Where a member's block store is: ``path`` (relative to the member folder) or a Hub repo."""

    store_id: str
    path: str | None = None
    repo_id: str | None = None
    revision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"store_id": self.store_id, "path": self.path, "repo_id": self.repo_id, "revision": self.revision}

    @classmethod
    def from_dict(cls, data: Any) -> "StoreRef":
        if not isinstance(data, dict) or not isinstance(data.get("store_id"), str):
            raise ConstitutionError(
                f"dedup_constitution.json: 'block_store' must be an object with a 'store_id'; {RESAVE}."
            )
        ref = cls(data["store_id"], data.get("path"), data.get("repo_id"), data.get("revision"))
        if any(v is not None and not isinstance(v, str) for v in (ref.path, ref.repo_id, ref.revision)):
            raise ConstitutionError(
                f"dedup_constitution.json: 'block_store' path, repo_id and revision must be strings; {RESAVE}."
            )
        if ref.path is None and ref.repo_id is None:
            raise ConstitutionError(
                "dedup_constitution.json: 'block_store' names neither a path nor a repo_id, so the "
                f"block store cannot be found; {RESAVE}."
            )
        return ref


@dataclass(frozen=True)
class AdapterRecord:
    """How an adapter member is rebuilt: the base class (built from the member's ``config.json``),
    wrapped by ``peft_class`` with the adapter ``config`` (the contents of ``adapter_config.json``)."""

    peft_type: str  # "LORA", ...
    task_type: str | None  # "SEQ_CLS", "CAUSAL_LM", ... (peft's TaskType), or None
    peft_class: str  # "PeftModelForSequenceClassification", ...
    base_model_class: str  # the transformers class of the base ("BertForSequenceClassification")
    config: dict[str, Any]  # the adapter config, as peft writes adapter_config.json
    base_model: str | None = None  # the base's Hub id or folder (adapter_config's base_model_name_or_path)
    adapter_name: str = "default"
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "library": "peft",
            "peft_type": self.peft_type,
            "task_type": self.task_type,
            "peft_class": self.peft_class,
            "adapter_name": self.adapter_name,
            "base_model": self.base_model,
            "base_model_class": self.base_model_class,
            "config": dict(self.config),
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: Any) -> "AdapterRecord":
        what = "dedup_constitution.json: 'adapter'"
        if not isinstance(data, dict):
            raise ConstitutionError(f"{what} must be an object; {RESAVE}.")
        for key in ("peft_type", "peft_class", "base_model_class", "adapter_name"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ConstitutionError(f"{what} needs a non-empty string {key!r}; {RESAVE}.")
        for key in ("task_type", "base_model"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ConstitutionError(f"{what}: {key!r} must be a string or null; {RESAVE}.")
        if not isinstance(data.get("config"), dict) or data["config"].get("peft_type") != data["peft_type"]:
            raise ConstitutionError(f"{what}: 'config' must be the adapter config of a {data['peft_type']} "
                                    f"adapter; {RESAVE}.")
        return cls(peft_type=data["peft_type"], task_type=data.get("task_type"), peft_class=data["peft_class"],
                   base_model_class=data["base_model_class"], config=dict(data["config"]),
                   base_model=data.get("base_model"), adapter_name=data["adapter_name"],
                   extra=unknown_keys(data, _ADAPTER_KEYS))


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    rows: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "numel": self.numel,
                "rows": encode_rows(self.rows)}

    def to_lean_dict(self, prefix: str) -> dict[str, Any]:
        """The format-4 entry: no dtype or numel, the name without ``prefix``."""
        return {"name": _strip(self.name, prefix), "shape": list(self.shape), "rows": encode_rows(self.rows)}


def encode_rows(rows: tuple[int, ...] | list[int]) -> list[int | list[int]]:
    """Row ids as written: each run of ≥ :data:`MIN_RUN` consecutive ids as ``[first, count]``."""
    out: list[int | list[int]] = []
    i = 0
    while i < len(rows):
        j = i + 1
        while j < len(rows) and rows[j] == rows[j - 1] + 1:
            j += 1
        if j - i >= MIN_RUN:
            out.append([rows[i], j - i])
        else:
            out.extend(rows[i:j])
        i = j
    return out


def has_runs(items: list[Any]) -> bool:
    return any(isinstance(item, list) for item in items)


def decode_rows(items: Any, name: str) -> tuple[int, ...]:
    """The row ids :func:`encode_rows` wrote (plain ids and ``[first, count]`` runs)."""
    if not isinstance(items, list):
        raise ConstitutionError(f"Tensor {name!r}: 'rows' must be a list of block row ids, got {items!r}; {RESAVE}.")
    rows: list[int] = []
    for item in items:
        if _int(item) and item >= 0:
            rows.append(item)
        elif isinstance(item, list) and len(item) == 2 and all(_int(v) for v in item) and item[0] >= 0 and item[1] >= 1:
            rows.extend(range(item[0], item[0] + item[1]))
        else:
            raise ConstitutionError(
                f"Tensor {name!r}: block row ids must be integers ≥ 0 or runs [first ≥ 0, count ≥ 1], "
                f"found {item!r}; {RESAVE}."
            )
    return tuple(rows)


@dataclass(frozen=True)
class Constitution:
    name: str
    block_store: StoreRef
    block_size: int
    dtype: str
    tensors: tuple[TensorEntry, ...]
    extras_sha256: str
    extras: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)
    architecture: str | None = None
    #: what the member as stored costs (after deduplication), see :mod:`.records`
    privacy: PrivacyMetadata | None = None
    #: what deduplication did to it
    dedup: DedupRecord | None = None
    #: fast digest of extras.safetensors, checked at load (absent in members written before it)
    extras_xxh3: str | None = None
    #: set when the member is a peft adapter on a base model (see the module docstring)
    adapter: AdapterRecord | None = None
    #: the extras packed into the block tensor ``PACKED_EXTRAS`` (see the module docstring)
    packed: tuple[PackedTensor, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def packed_tensor(self) -> TensorEntry | None:
        """The block tensor ``PACKED_EXTRAS`` that :attr:`packed` slices (None: nothing packed)."""
        return _packed_tensor(self.tensors)

    @property
    def all_rows(self) -> list[int]:
        return [r for t in self.tensors for r in t.rows]

    @property
    def format(self) -> str:
        """The format :meth:`to_dict` writes: the oldest that holds what this constitution has."""
        if self.packed or any(has_runs(encode_rows(t.rows)) for t in self.tensors):
            return LEAN_MEMBER_FORMAT
        return ADAPTER_MEMBER_FORMAT if self.adapter is not None else FORMAT

    def to_dict(self) -> dict[str, Any]:
        format_ = self.format
        lean = format_ == LEAN_MEMBER_FORMAT
        prefix = name_prefix(self._model_names()) if lean else ""
        tensors = [t.to_lean_dict(prefix) if lean else t.to_dict() for t in self.tensors]
        return {
            "format": format_,
            "kind": "member",
            "name": self.name,
            "architecture": self.architecture,
            "block_store": self.block_store.to_dict(),
            "block_size": self.block_size,
            "dtype": self.dtype,
            **({"name_prefix": prefix} if prefix else {}),
            "tensors": tensors,
            **({"packed_extras": [{"name": _strip(p.name, prefix), "shape": list(p.shape)} for p in self.packed]}
               if self.packed else {}),
            "extras": {
                "file": EXTRAS_FILE,
                "sha256": self.extras_sha256,
                **({"xxh3_128": self.extras_xxh3} if self.extras_xxh3 else {}),
                "tensors": [_strip(n, prefix) for n in self.extras],
            },
            "aliases": {_strip(a, prefix): _strip(c, prefix) for a, c in self.aliases.items()},
            "privacy": privacy_to_dict(self.privacy) if self.privacy is not None else None,
            "dedup": self.dedup.to_dict() if self.dedup is not None else None,
            # formats 3 and 4 always name their adapter record (null: none), so that one lost from the file is noticed
            **({"adapter": self.adapter.to_dict() if self.adapter is not None else None}
               if self.adapter is not None or lean else {}),
            **self.extra,
        }

    def _model_names(self) -> list[str]:
        """Every name of a model tensor the constitution writes (not the reserved ``PACKED_EXTRAS``)."""
        return [*(t.name for t in self.tensors if t.name != PACKED_EXTRAS), *(p.name for p in self.packed),
                *self.extras, *self.aliases, *self.aliases.values()]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Constitution":
        what = "dedup_constitution.json"
        check_format(data, what, accepted=(FORMAT, ADAPTER_MEMBER_FORMAT, *_COMPACT), fix=RESAVE)
        adapter = AdapterRecord.from_dict(data["adapter"]) if data.get("adapter") is not None else None
        compact, lean = data["format"] in _COMPACT, data["format"] == LEAN_MEMBER_FORMAT
        if compact and "adapter" not in data:
            raise ConstitutionError(f"{what}: format {data['format']!r} names its 'adapter' record (null for "
                                    f"a plain model), but this one has none; {RESAVE}.")
        if not compact and (adapter is not None) != (data["format"] == ADAPTER_MEMBER_FORMAT):
            raise ConstitutionError(
                f"{what}: format {data['format']!r} "
                + ("without an 'adapter' record" if adapter is None else "with an 'adapter' record")
                + f" (adapter members are {ADAPTER_MEMBER_FORMAT!r}, others {FORMAT!r}); {RESAVE}."
            )
        prefix = data.get("name_prefix", "")
        if not isinstance(prefix, str) or (prefix and not lean):
            raise ConstitutionError(f"{what}: 'name_prefix' must be a string, and only format "
                                    f"{LEAN_MEMBER_FORMAT!r} has one; {RESAVE}.")
        whole = _prefixed(prefix)
        try:
            block_size = check_block_size(data.get("block_size"))
        except BlockLayoutError as exc:
            raise ConstitutionError(f"{what}: {exc} {RESAVE[0].upper()}{RESAVE[1:]}.") from None
        dtype = data.get("dtype")
        if not isinstance(dtype, str) or dtype not in BLOCK_DTYPES:
            raise ConstitutionError(f"{what}: dtype {dtype!r} is not one of {sorted(BLOCK_DTYPES)}; {RESAVE}.")
        extras = data.get("extras")
        if not isinstance(extras, dict) or not isinstance(extras.get("sha256"), str):
            raise ConstitutionError(f"{what}: 'extras' must record the sha256 of {EXTRAS_FILE}; {RESAVE}.")
        extra_names = extras.get("tensors") or []
        xxh3 = extras.get("xxh3_128")
        if not _strings(extra_names) or (xxh3 is not None and not isinstance(xxh3, str)):
            raise ConstitutionError(f"{what}: 'extras' must list tensor names as strings; {RESAVE}.")
        if not isinstance(data.get("tensors"), list):
            raise ConstitutionError(f"{what}: 'tensors' must be a list; {RESAVE}.")
        tensors = tuple(_tensor_entry(t, block_size, dtype, compact=compact, lean=lean, whole=whole)
                        for t in data["tensors"])
        packed = _packed(data.get("packed_extras"), tensors, compact=compact, lean=lean, whole=whole)
        aliases = data.get("aliases") or {}
        if not isinstance(aliases, dict) or not _strings(aliases) or not _strings(aliases.values()):
            raise ConstitutionError(f"{what}: 'aliases' must map tensor names to tensor names; {RESAVE}.")
        extra_names = [whole(n) for n in extra_names]
        aliases = {whole(a): whole(c) for a, c in aliases.items()}
        _check_names([t.name for t in tensors] + [p.name for p in packed], list(extra_names), aliases)
        for key in ("name", "architecture"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ConstitutionError(f"{what}: {key!r} must be a string; {RESAVE}.")
        return cls(
            name=data.get("name") or "",
            block_store=StoreRef.from_dict(data.get("block_store")),
            block_size=block_size,
            dtype=dtype,
            tensors=tensors,
            extras_sha256=extras["sha256"],
            extras=tuple(extra_names),
            aliases=dict(aliases),
            architecture=data.get("architecture"),
            privacy=privacy_from_dict(data["privacy"]) if data.get("privacy") is not None else None,
            dedup=DedupRecord.from_dict(data["dedup"]) if data.get("dedup") is not None else None,
            extras_xxh3=xxh3,
            adapter=adapter,
            packed=packed,
            extra=unknown_keys(data, _KEYS),
        )


def name_prefix(names: list[str]) -> str:
    """The longest common prefix of ``names`` that ends with a ``.`` and leaves every name non-empty
    and different from the reserved ``PACKED_EXTRAS`` ("" when there is none, or no names)."""
    common = os.path.commonprefix(names)
    prefix = common[: common.rfind(".") + 1]
    return prefix if all(n[len(prefix):] not in ("", PACKED_EXTRAS) for n in names) else ""


def _strip(name: str, prefix: str) -> str:
    """``name`` as format 4 writes it: without ``prefix`` (never the reserved ``PACKED_EXTRAS``)."""
    return name if name == PACKED_EXTRAS or not prefix else name[len(prefix):]


def _prefixed(prefix: str) -> Callable[[str], str]:
    """A written name made whole again (the inverse of :func:`_strip`)."""
    return lambda name: name if name == PACKED_EXTRAS else prefix + name


def _packed(data: Any, tensors: tuple[TensorEntry, ...], *, compact: bool, lean: bool = False,
            whole: Callable[[str], str] = str) -> tuple[PackedTensor, ...]:
    """``packed_extras``: consecutive slices that tile the ``PACKED_EXTRAS`` block tensor exactly (format
    4 leaves their offsets implied: each starts where the one before ends)."""
    what = "dedup_constitution.json: 'packed_extras'"
    holder = _packed_tensor(tensors)
    if data is None:
        if holder is not None:
            raise ConstitutionError(f"{what} is missing, but the tensors hold {PACKED_EXTRAS!r}; {RESAVE}.")
        return ()
    if not compact:
        raise ConstitutionError(f"{what} exist only in formats {_COMPACT!r}; {RESAVE}.")
    if holder is None or len(holder.shape) != 1:
        raise ConstitutionError(f"{what} needs the 1-D block tensor {PACKED_EXTRAS!r} among the tensors; {RESAVE}.")
    if not isinstance(data, list) or not data:
        raise ConstitutionError(f"{what} must be a non-empty list; {RESAVE}.")
    packed, offset = [], 0
    for item in data:
        ok = (isinstance(item, dict) and isinstance(item.get("name"), str) and item["name"]
              and isinstance(item.get("shape"), list) and all(_int(d) and d >= 0 for d in item["shape"])
              and _int(item.get("offset", offset if lean else None)))
        if not ok:
            raise ConstitutionError(f"{what}: {item!r} must name a tensor, its shape and its offset; {RESAVE}.")
        entry = PackedTensor(whole(item["name"]), tuple(item["shape"]), item.get("offset", offset))
        if entry.offset != offset or entry.numel == 0:
            raise ConstitutionError(f"{what}: {entry.name!r} starts at {entry.offset}, but the packed tensors must "
                                    f"follow each other from 0 (expected {offset}), each non-empty; {RESAVE}.")
        packed.append(entry)
        offset += entry.numel
    if offset != holder.numel:
        raise ConstitutionError(f"{what} cover {offset} values, but {PACKED_EXTRAS!r} holds {holder.numel}; {RESAVE}.")
    return tuple(packed)


def _packed_tensor(tensors: tuple[TensorEntry, ...]) -> TensorEntry | None:
    return next((t for t in tensors if t.name == PACKED_EXTRAS), None)


def _strings(values: Any) -> bool:
    return all(isinstance(v, str) and v for v in values)


def _check_names(tensors: list[str], extras: list[str], aliases: dict[str, str]) -> None:
    """Every tensor name appears once (a name listed twice would silently take the second entry)."""
    seen: set[str] = set()
    for name in [*tensors, *extras, *aliases]:
        if name in seen:
            raise ConstitutionError(
                f"dedup_constitution.json lists tensor {name!r} twice (as block tensor, extra or alias); {RESAVE}."
            )
        seen.add(name)
    dangling = sorted(c for c in aliases.values() if c not in seen or c in aliases)
    if dangling:
        raise ConstitutionError(
            f"dedup_constitution.json: aliases point at {dangling[:5]}, which the member does not hold; {RESAVE}."
        )


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_entry(data: Any, block_size: int, dtype: str, *, compact: bool, lean: bool = False,
                  whole: Callable[[str], str] = str) -> TensorEntry:
    what = "dedup_constitution.json tensor entry"
    if not isinstance(data, dict):
        raise ConstitutionError(f"{what} {data!r} is not an object; {RESAVE}.")
    name, shape, rows = data.get("name"), data.get("shape"), data.get("rows")
    if not isinstance(name, str) or not name:
        raise ConstitutionError(f"{what}: 'name' must be a non-empty string, got {name!r}; {RESAVE}.")
    if not isinstance(shape, list) or not all(_int(d) and d >= 0 for d in shape):
        raise ConstitutionError(f"Tensor {name!r}: shape {shape!r} must be a list of integers ≥ 0; {RESAVE}.")
    if not compact and isinstance(rows, list) and has_runs(rows):
        raise ConstitutionError(
            f"Tensor {name!r} lists row runs [first, count], which only formats {_COMPACT!r} have, in "
            f"a constitution of an older format; {RESAVE}."
        )
    name = whole(name)
    entry = TensorEntry(name=name, shape=tuple(shape), dtype=str(data.get("dtype", dtype if lean else None)),
                        rows=decode_rows(rows, name))
    if entry.dtype != dtype:
        raise ConstitutionError(
            f"Tensor {entry.name!r} is recorded as {entry.dtype} in a {dtype} block family; the "
            f"constitution is inconsistent: {RESAVE}."
        )
    if "numel" in data and data["numel"] != entry.numel:
        raise ConstitutionError(
            f"Tensor {entry.name!r}: numel {data['numel']!r} does not match its shape {list(entry.shape)}; {RESAVE}."
        )
    needed = math.ceil(entry.numel / block_size)
    if entry.numel == 0 or len(entry.rows) != needed:
        raise ConstitutionError(
            f"Tensor {entry.name!r} of shape {list(entry.shape)} needs {needed} blocks of size "
            f"{block_size}, but the constitution lists {len(entry.rows)}: its blocks do not cover its "
            f"shape. {RESAVE[0].upper()}{RESAVE[1:]}."
        )
    return entry
