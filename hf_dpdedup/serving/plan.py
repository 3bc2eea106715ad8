"""Member plans: what the pool needs to know about a member before composing it.

A plan is read once per member when the pool opens (constitution, config, model class) and names
every tensor by a :class:`TensorKey`: block tensors by their row ids, extras by the sha256 of their
bytes. Two members whose tensor has the same key hold the same values, so the pool gives them one
shared tensor object. The plan also carries an *architecture signature*: members with equal
signatures have interchangeable module trees, so one's model can be re-pointed to the other.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from ..blocks import PACKED_EXTRAS, parse_dtype
from ..errors import AdapterNotSupportedError, BlockLayoutError, ChecksumMismatchError, StoreFormatError
from ..skeleton import architecture_class, read_config
from ..store.constitution import Constitution
from ..store.member import parse_constitution, read_constitution_bytes, read_extras_file

#: config fields that differ between members of one architecture without changing the module tree
_VOLATILE_CONFIG = ("_name_or_path", "transformers_version", "architectures", "_commit_hash")


@dataclass(frozen=True)
class TensorKey:
    """Identity of a tensor's values: ``("rows", row ids)``, ``("packed", (offset, *row ids))`` (a
    packed extra: its offset in the rows it lies in, and those rows only, so members whose rows
    there agree share it) or ``("extra", sha256)``, shape, dtype."""

    kind: str
    ident: tuple[int, ...] | str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's values."""
        return math.prod(self.shape) * parse_dtype_any(self.dtype).itemsize


@dataclass(frozen=True)
class MemberPlan:
    """Everything needed to compose member ``name`` from the pool's row memory."""

    name: str
    path: Path
    constitution: Constitution
    config: Any  # transformers PretrainedConfig
    klass: type
    signature: str
    tensors: dict[str, TensorKey]  # block tensors and extras, canonical names only
    aliases: dict[str, str]  # tied name -> canonical name
    constitution_sha256: str  # of the constitution file the pool read when it opened

    @cached_property
    def keys(self) -> frozenset[TensorKey]:
        """The member's distinct tensor keys."""
        return frozenset(self.tensors.values())

    @property
    def full_bytes(self) -> int:
        """Bytes of this member as one ordinary model (each distinct tensor once)."""
        return sum(k.nbytes for k in self.tensors.values())

    @property
    def rows(self) -> list[int]:
        return self.constitution.all_rows


def parse_dtype_any(name: str) -> torch.dtype:
    """A dtype by name: block dtypes, and any other torch dtype an extra may have (int64, bool...)."""
    try:
        return parse_dtype(name)
    except BlockLayoutError:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise
        return dtype


def read_plan(name: str, member_dir: Path, *, verify: bool = True) -> MemberPlan:
    """Read member ``name``'s folder into a :class:`MemberPlan` (extras are hashed, not kept)."""
    raw = read_constitution_bytes(member_dir)
    constitution = parse_constitution(raw, member_dir)
    if constitution.adapter is not None:
        raise AdapterNotSupportedError(
            f"Member {name!r} is a peft adapter member ({constitution.adapter.peft_class} on "
            f"{constitution.adapter.base_model_class}); the serving pool serves full members only. Leave it out "
            "(ServingPool(..., members=[...])) and load it with DedupedModel.from_pretrained(path) (a PeftModel) or "
            "DedupedModel.from_pretrained(path, merge_adapter=True); or store merge_and_unload() of the adapter "
            "as the member to serve it from a pool."
        )
    config = read_config(member_dir)
    klass = architecture_class(config, constitution.architecture)
    tensors = {
        t.name: TensorKey("rows", t.rows, t.shape, t.dtype) for t in constitution.tensors if t.name != PACKED_EXTRAS
    }
    holder = constitution.packed_tensor
    for p in constitution.packed:  # each packed extra is a slice of the rows it lies in
        assert holder is not None  # the constitution checks it on reading
        first, last = p.offset // constitution.block_size, (p.offset + p.numel - 1) // constitution.block_size
        local = p.offset - first * constitution.block_size
        tensors[p.name] = TensorKey("packed", (local, *holder.rows[first : last + 1]), p.shape, holder.dtype)
    tensors.update(extra_keys(member_dir, constitution, verify=verify))
    return MemberPlan(
        name=name,
        path=member_dir,
        constitution=constitution,
        config=config,
        klass=klass,
        signature=_signature(klass, config, tensors, constitution.aliases),
        tensors=tensors,
        aliases=dict(constitution.aliases),
        constitution_sha256=hashlib.sha256(raw).hexdigest(),
    )


def check_unchanged(plan: MemberPlan) -> None:
    """The member folder still holds the constitution the pool opened with (checked when the pool
    composes the member: it serves what it verified then, or says the member changed)."""
    changed = (f"Member {plan.name!r} changed after the serving pool opened ({plan.path}): restore it, or "
               "open a new pool if it was re-added or removed on purpose.")
    try:
        raw = read_constitution_bytes(plan.path)
    except StoreFormatError as exc:
        raise StoreFormatError(f"{exc} {changed}") from None
    if hashlib.sha256(raw).hexdigest() != plan.constitution_sha256:
        raise StoreFormatError(changed)


def load_tokenizer(member_dir: Path) -> Any | None:
    """The member folder's tokenizer, or None when it has no tokenizer files."""
    if not any((member_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(member_dir)


def extra_keys(member_dir: Path, constitution: Constitution, *, verify: bool = True) -> dict[str, TensorKey]:
    """The key of each extra tensor: the sha256 of its bytes (so equal extras share one tensor)."""
    tensors = read_extras_file(member_dir, constitution, verify)
    return {
        name: TensorKey("extra", _digest(t), tuple(t.shape), str(t.dtype).removeprefix("torch."))
        for name, t in tensors.items()
    }


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def read_extras(member_dir: Path, constitution: Constitution, keys: dict[str, TensorKey]) -> dict[str, torch.Tensor]:
    """Extras ``keys`` of a member (read again when the pool composes it), each in its own memory,
    checked against the digests the plan recorded when the pool opened: a file corrupted, replaced
    or removed since then is an error, never a silently different value."""
    try:
        tensors = read_extras_file(member_dir, constitution, verify=False)
    except StoreFormatError as exc:
        raise StoreFormatError(
            f"{exc} The member's folder changed after the serving pool opened: restore it, or open a "
            "new pool if it was re-added on purpose."
        ) from None
    out = {}
    for name, key in keys.items():
        tensor = tensors.get(name)
        if tensor is None or _digest(tensor) != key.ident:
            raise ChecksumMismatchError(
                f"Extra tensor {name!r} of member {member_dir.name} differs from what the serving pool "
                f"verified when it opened: {member_dir}/extras.safetensors was modified or replaced. "
                "Restore the member (download it again, or re-run add_model), then open a new pool."
            )
        out[name] = tensor
    return out


def _signature(klass: type, config: Any, tensors: dict[str, TensorKey], aliases: dict[str, str]) -> str:
    """Equal for members whose models have the same class, config and tensor shapes."""
    cfg = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG}
    layout = sorted((n, list(k.shape), k.dtype) for n, k in tensors.items())
    raw = json.dumps([klass.__module__, klass.__qualname__, cfg, layout, sorted(aliases.items())],
                     sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()
