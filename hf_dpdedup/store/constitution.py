"""``dedup_constitution.json``: how one member model is rebuilt from a block store.

It names the block store (its id, and where to find it: a relative path for local folders, or a
Hub repo id with a *pinned* commit sha), the block size and dtype, and for every block tensor its
shape and the list of store rows that hold its blocks, in order. Extras (small tensors) live in the
member's ``extras.safetensors`` whose sha256 is recorded here; ``aliases`` restores tied weights.
``privacy`` and ``dedup`` carry the model's privacy metadata and the deduplication record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..blocks import BLOCK_DTYPES, check_block_size
from ..errors import BlockLayoutError, ConstitutionError
from .format import EXTRAS_FILE, FORMAT, check_format


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
            raise ConstitutionError("dedup_constitution.json: 'block_store' must be an object with a 'store_id'.")
        ref = cls(data["store_id"], data.get("path"), data.get("repo_id"), data.get("revision"))
        if ref.path is None and ref.repo_id is None:
            raise ConstitutionError(
                "dedup_constitution.json: 'block_store' names neither a path nor a repo_id, so the "
                "block store cannot be found; re-save the member."
            )
        return ref


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
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "numel": self.numel, "rows": list(self.rows)}


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
    privacy: dict[str, Any] | None = None
    dedup: dict[str, Any] | None = None

    @property
    def all_rows(self) -> list[int]:
        return [r for t in self.tensors for r in t.rows]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": "member",
            "name": self.name,
            "architecture": self.architecture,
            "block_store": self.block_store.to_dict(),
            "block_size": self.block_size,
            "dtype": self.dtype,
            "tensors": [t.to_dict() for t in self.tensors],
            "extras": {"file": EXTRAS_FILE, "sha256": self.extras_sha256, "tensors": list(self.extras)},
            "aliases": dict(self.aliases),
            "privacy": self.privacy,
            "dedup": self.dedup,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Constitution":
        what = "dedup_constitution.json"
        check_format(data, what)
        try:
            block_size = check_block_size(data.get("block_size"))
        except BlockLayoutError as exc:
            raise ConstitutionError(f"{what}: {exc}") from None
        dtype = data.get("dtype")
        if dtype not in BLOCK_DTYPES:
            raise ConstitutionError(f"{what}: dtype {dtype!r} is not one of {sorted(BLOCK_DTYPES)}.")
        extras = data.get("extras")
        if not isinstance(extras, dict) or not isinstance(extras.get("sha256"), str):
            raise ConstitutionError(f"{what}: 'extras' must record the sha256 of {EXTRAS_FILE}.")
        try:
            tensors = tuple(_tensor_entry(t, block_size, dtype) for t in data["tensors"])
            aliases = dict(data.get("aliases") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise ConstitutionError(f"{what}: malformed tensor list ({exc!r}); re-save the member.") from None
        return cls(
            name=str(data.get("name", "")),
            block_store=StoreRef.from_dict(data.get("block_store")),
            block_size=block_size,
            dtype=dtype,
            tensors=tensors,
            extras_sha256=extras["sha256"],
            extras=tuple(extras.get("tensors") or ()),
            aliases=aliases,
            architecture=data.get("architecture"),
            privacy=data.get("privacy"),
            dedup=data.get("dedup"),
        )


def _tensor_entry(data: dict[str, Any], block_size: int, dtype: str) -> TensorEntry:
    entry = TensorEntry(
        name=str(data["name"]),
        shape=tuple(int(d) for d in data["shape"]),
        dtype=str(data["dtype"]),
        rows=tuple(int(r) for r in data["rows"]),
    )
    if entry.dtype != dtype:
        raise ConstitutionError(
            f"Tensor {entry.name!r} is recorded as {entry.dtype} in a {dtype} block family; the "
            "constitution is inconsistent: re-save the member."
        )
    if "numel" in data and int(data["numel"]) != entry.numel:
        raise ConstitutionError(
            f"Tensor {entry.name!r}: numel {data['numel']} does not match its shape {list(entry.shape)}."
        )
    needed = math.ceil(entry.numel / block_size)
    if entry.numel == 0 or len(entry.rows) != needed:
        raise ConstitutionError(
            f"Tensor {entry.name!r} of shape {list(entry.shape)} needs {needed} blocks of size "
            f"{block_size}, but the constitution lists {len(entry.rows)}: its blocks do not cover its "
            "shape. The member is damaged; re-save it from the original model."
        )
    return entry
