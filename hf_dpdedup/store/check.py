"""Integrity checks of whole stores, as ``hf-dpdedup inspect`` runs them.

``check_files`` is cheap (every file the indexes name exists and has the recorded size);
``verify=True`` also hashes every shard and extras file with sha256 (the digest recorded where the
bytes arrived), reads every shard header, and checks each shard's rows against the sha256 of their
row hashes that a ``hf_dpdedup/3`` index records. Problems are returned as sentences, each saying what
to do; nothing is repaired.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import HfDpDedupError
from .block_store import BlockStore
from .family import FamilyStore
from .format import CONSTITUTION_FILE, EXTRAS_FILE, INDEX_FILE
from .io import forget_verified, live_dir, verify_file
from .member import read_constitution
from .row_digests import derive as derive_row_hashes


def store_problems(store: BlockStore, *, verify: bool) -> list[str]:
    problems = []
    for shard in store.index.shards:
        path = store.path / shard.file
        if not path.is_file():
            problems.append(f"block shard {path} is missing: copy or download it again.")
        elif path.stat().st_size != shard.bytes:
            problems.append(
                f"block shard {path} has {path.stat().st_size} bytes but the index records {shard.bytes} "
                "(truncated or extended): delete it and copy or download it again."
            )
        elif verify:
            try:
                verify_file(path, shard.sha256, what="block shard")
                rows = store.read_shards([shard], verify=False)[shard.first_row]  # the header must match
                derive_row_hashes(shard, rows, store.path)  # and the rows the index's row_hashes_sha256
            except HfDpDedupError as exc:
                problems.append(str(exc))
    return problems


def member_problems(member_dir: Path, *, verify: bool) -> list[str]:
    folder = live_dir(member_dir)
    try:
        constitution = read_constitution(member_dir)
    except HfDpDedupError as exc:
        return [str(exc)]
    extras = folder / EXTRAS_FILE
    if not extras.is_file():
        return [f"{extras} is missing: download the member again, or re-run add_model for it."]
    if verify:
        try:
            verify_file(extras, constitution.extras_sha256, what="extras file")
        except HfDpDedupError as exc:
            return [str(exc)]
    return []


def problems(path: str | Path, *, verify: bool = False) -> list[str]:
    """What is wrong with a family folder, block store or member folder (empty: nothing found)."""
    path = Path(path)
    forget_verified()  # a check hashes the files as they are now
    if FamilyStore.is_family(path):
        family = FamilyStore.open(path)
        found = store_problems(family.blocks, verify=verify)
        for name in family.members():
            found += member_problems(family.member_path(name), verify=verify)
        return found
    if (path / INDEX_FILE).is_file():
        return store_problems(BlockStore.open(path), verify=verify)
    if (live_dir(path) / CONSTITUTION_FILE).is_file():
        return member_problems(path, verify=verify)
    return []
