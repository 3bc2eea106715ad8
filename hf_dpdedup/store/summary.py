"""Summaries of stores and members (what ``hf-dpdedup inspect`` prints), as plain dicts."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..blocks import parse_dtype
from ..errors import StoreFormatError
from ..privacy.metadata import encode_float
from .block_store import BlockStore
from .constitution import Constitution
from .family import FamilyStore
from .format import CONSTITUTION_FILE, INDEX_FILE
from .member import read_constitution


def store_summary(store: BlockStore) -> dict[str, Any]:
    index = store.index
    return {
        "format": index.format,
        "codec": store.codec.value,
        "path": str(store.path),
        "store_id": index.store_id,
        "block_size": index.block_size,
        "dtype": index.dtype,
        "rows": index.total_rows,
        "shards": len(index.shards),
        "shard_bytes": sum(s.bytes for s in index.shards),
        "stored_bytes": store.stored_bytes(),
    }


def member_summary(member_dir: Path, constitution: Constitution, row_users: Counter | None = None) -> dict[str, Any]:
    itemsize = parse_dtype(constitution.dtype).itemsize
    rows = constitution.all_rows
    distinct = set(rows)
    block_elements = sum(t.numel for t in constitution.tensors)
    files = {f.name: f.stat().st_size for f in member_dir.iterdir() if f.is_file()}
    summary: dict[str, Any] = {
        "name": constitution.name,
        # an adapter member shows its adapter on the base class: "BertForSequenceClassification+LORA"
        "architecture": (f"{constitution.architecture}+{constitution.adapter.peft_type}"
                         if constitution.adapter is not None else constitution.architecture),
        "adapter": constitution.adapter.to_dict() if constitution.adapter is not None else None,
        # small tensors are extras whether packed into rows or kept in the extras file
        "block_tensors": len(constitution.tensors) - (1 if constitution.packed else 0),
        "extras": len(constitution.extras) + len(constitution.packed),
        "packed_extras": len(constitution.packed),
        "tied": len(constitution.aliases),
        "blocks": len(rows),
        "distinct_rows": len(distinct),
        "block_tensor_bytes": block_elements * itemsize,
        "member_file_bytes": sum(files.values()),
        "epsilon": encode_float(constitution.privacy.epsilon) if constitution.privacy is not None else None,
        "delta": constitution.privacy.delta if constitution.privacy is not None else None,
    }
    if row_users is not None:
        summary["unique_rows"] = sum(1 for r in distinct if row_users[r] == 1)
        summary["shared_rows"] = len(distinct) - summary["unique_rows"]
    return summary


def family_summary(family: FamilyStore) -> dict[str, Any]:
    constitutions = {name: family.constitution(name) for name in family.members()}
    users: Counter = Counter()
    for c in constitutions.values():
        users.update(set(c.all_rows))
    members = [member_summary(family.member_path(n), c, users) for n, c in constitutions.items()]
    logical = sum(m["block_tensor_bytes"] for m in members)
    store = store_summary(family.blocks)
    store["shared_rows"] = sum(1 for count in users.values() if count > 1)
    return {
        "kind": "family",
        "store": store,
        "members": members,
        "logical_block_bytes": logical,
        "stored_bytes": family.stored_bytes(),
        "exact_dedup_ratio": (store["shard_bytes"] / logical) if logical else None,
    }


def summarize(path: str | Path) -> dict[str, Any]:
    """Summary of whatever ``path`` is: a family folder, a block store, or a member folder."""
    path = Path(path)
    if FamilyStore.is_family(path):
        return family_summary(FamilyStore.open(path))
    if (path / INDEX_FILE).is_file():
        return {"kind": "block_store", "store": store_summary(BlockStore.open(path))}
    if (path / CONSTITUTION_FILE).is_file():
        constitution = read_constitution(path)
        return {"kind": "member", "member": member_summary(path, constitution), "block_store": constitution.block_store.to_dict()}
    raise StoreFormatError(
        f"{path} is neither a family folder, a block store ({INDEX_FILE}) nor a member "
        f"({CONSTITUTION_FILE}). Pass one of those."
    )
