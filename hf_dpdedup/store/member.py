"""Member folders: write one model into a block store, and read its state dict back.

A member folder holds the transformers ``config.json`` (unchanged), tokenizer / processor files,
``dedup_constitution.json`` and ``extras.safetensors``; an adapter member also ``adapter_config.json``
(its ``config.json`` is then the base model's). It is built under a temporary name and
swapped in (atomically, under the members folder's lock) only after its rows are in the store's
index, so a member never names missing rows. Readers (:func:`read_consistently`) notice when a
member was swapped while they read it and read it again, so they see one version, never a mix.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from ..blocks import PACKED_EXTRAS, BlockLayout, BlockRows, pack_extras, plan_layout, tensor_from_rows, unpack_extras
from ..errors import ConstitutionError, HfDpDedupError, MemberChangedError, StoreFormatError, StoreMismatchError
from .block_store import BlockStore
from .remap import RowMapper
from .adapter import adapter_config_bytes
from .constitution import AdapterRecord, Constitution, StoreRef, TensorEntry
from .format import ADAPTER_CONFIG_FILE, CONSTITUTION_FILE, EXTRAS_FILE, LOCK_FILE, RESAVE
from ..privacy.metadata import PrivacyMetadata
from .records import DedupRecord
from .io import (
    atomic_write_json,
    check_buffer,
    describe_os_error,
    fast_digest,
    file_identity,
    live_dir,
    parse_json,
    read_bytes,
    replace_dir,
    sha256_bytes,
)

T = TypeVar("T")
#: how often a reader starts again when the member was swapped under it
READ_ATTEMPTS = 5

#: files copied from a model folder into its member folder (config, tokenizer, processor, ...)
MODEL_SIDE_FILES = re.compile(
    r"^(config\.json|generation_config\.json|tokenizer.*|vocab\.(txt|json)|merges\.txt|"
    r"special_tokens_map\.json|added_tokens\.json|.*processor_config\.json|spiece\.model|"
    r"sentencepiece\.bpe\.model|chat_template\.(jinja|json))$"
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def check_member_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise StoreFormatError(
            f"Member name {name!r} is not allowed: use letters, digits, '.', '_' or '-' "
            "(e.g. 'minilm-sst2-eps4'), starting with a letter or digit."
        )
    return name


# a member's dedup record, or how to make it from its constitution and its extras file's size
DedupRecordSource = DedupRecord | Callable[[Constitution, int], DedupRecord] | None


@dataclass(frozen=True)
class MemberSource:
    """What a member is made of besides its weights."""

    config: Any | None = None  # a transformers PretrainedConfig
    files_from: Path | None = None  # a model folder whose side files (tokenizer, ...) are copied
    tokenizer: Any | None = None  # anything with save_pretrained (tokenizer, processor)


def write_member(
    store: BlockStore,
    member_dir: Path,
    name: str,
    state_dict: Mapping[str, torch.Tensor],
    source: MemberSource,
    *,
    architecture: str | None = None,
    privacy: PrivacyMetadata | None = None,
    dedup: DedupRecordSource = None,
    adapter: AdapterRecord | None = None,
) -> Constitution:
    """Add a model's blocks to ``store`` and write its member folder at ``member_dir`` (with
    ``adapter``: an adapter member, whose ``state_dict`` is the whole ``PeftModel``'s).

    ``dedup`` is the member's dedup record, or a function that makes it from the finished
    constitution and the size of its extras file (figures such as its own stored bytes are known
    only then): either way the constitution is written once, complete."""
    check_member_name(name)
    check_records(privacy, dedup)
    check_source(source)  # before any row is appended: a failed add leaves the store as it was
    # small floating extras become one more block tensor: rows shared with every member that has them
    layout, state_dict, packed = pack_extras(state_dict, plan_layout(state_dict, store.block_size))
    # views of the tensors' blocks: the store copies one shard's new rows at a time, never the model
    matrix = BlockRows.of(state_dict, layout) if layout.tensors else _empty(store)
    row_ids = store.add_rows(matrix, groups=[t.n_blocks for t in layout.tensors])
    extras = {k: state_dict[k].detach().contiguous().clone() for k in layout.extras}
    ref = StoreRef(store.store_id, path=os.path.relpath(store.path.resolve(), member_dir.resolve()))

    constitution: Constitution | None = None

    def build(tmp: Path) -> None:
        nonlocal constitution
        _write_side_files(tmp, source)
        if adapter is not None:
            (tmp / ADAPTER_CONFIG_FILE).write_bytes(adapter_config_bytes(adapter))
        save_file(extras, tmp / EXTRAS_FILE, metadata={"format": "pt"})
        raw = (tmp / EXTRAS_FILE).read_bytes()
        constitution = Constitution(
            name=name,
            block_store=ref,
            block_size=store.block_size,
            dtype=store.index.dtype,
            tensors=_entries(layout, row_ids),
            extras_sha256=sha256_bytes(raw),
            extras=tuple(layout.extras),
            aliases=dict(layout.aliases),
            architecture=architecture,
            privacy=privacy,
            dedup=None if callable(dedup) else dedup,
            extras_xxh3=fast_digest(raw),
            adapter=adapter,
            packed=packed,
        )
        if callable(dedup):
            constitution = replace(constitution, dedup=dedup(constitution, len(raw)))
            check_records(privacy, constitution.dedup)
        atomic_write_json(tmp / CONSTITUTION_FILE, constitution.to_dict())

    replace_dir(build, member_dir, lock=member_dir.parent / LOCK_FILE)
    assert constitution is not None
    return constitution


def check_source(source: MemberSource) -> None:
    """A member needs a transformers ``config.json``: refuse early, before anything is written."""
    has_folder_config = source.files_from is not None and (Path(source.files_from) / "config.json").is_file()
    if source.config is None and not has_folder_config:
        raise StoreFormatError(
            "A member needs its transformers config.json: pass a model (its config is used), "
            "config=..., or a model folder that has one (files_from=...). Nothing was written."
        )


def _empty(store: BlockStore) -> torch.Tensor:
    return torch.empty(0, store.block_size, dtype=store.dtype)


def _entries(layout: BlockLayout, row_ids: list[int]) -> tuple[TensorEntry, ...]:
    return tuple(
        TensorEntry(t.name, t.shape, t.dtype, tuple(row_ids[t.first_block : t.first_block + t.n_blocks]))
        for t in layout.tensors
    )


def _write_side_files(tmp: Path, source: MemberSource) -> None:
    if source.files_from is not None:
        for f in sorted(Path(source.files_from).iterdir()):
            if f.is_file() and MODEL_SIDE_FILES.match(f.name):
                shutil.copy2(f, tmp / f.name)
    if source.config is not None:
        source.config.save_pretrained(tmp)
    if source.tokenizer is not None:
        source.tokenizer.save_pretrained(tmp)
    if not (tmp / "config.json").is_file():
        raise StoreFormatError(
            "A member needs its transformers config.json: pass a model (its config is used), "
            "config=..., or a model folder that has one."
        )


def check_records(privacy: Any, dedup: Any) -> None:
    """The typed records a constitution takes (a plain dict is refused before anything is written)."""
    if privacy is not None and not isinstance(privacy, PrivacyMetadata):
        raise TypeError(f"privacy must be a hf_dpdedup.PrivacyMetadata (PrivacyMetadata.from_dict reads a dict), "
                        f"got {type(privacy).__name__}.")
    if dedup is not None and not callable(dedup) and not isinstance(dedup, DedupRecord):
        raise TypeError("dedup must be a hf_dpdedup.store.records.DedupRecord (DedupRecord.from_dict reads a dict) "
                        f"or a function that makes one, got {type(dedup).__name__}.")


def update_dedup_record(member_dir: Path, updates: dict[str, Any]) -> Constitution:
    """Merge ``updates`` (``None`` values dropped; JSON fields of :class:`DedupRecord`) into a
    member's ``dedup`` record, atomically (the member folder is swapped like any other member write)."""
    out: Constitution | None = None

    def build(tmp: Path) -> None:
        nonlocal out
        for f in member_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        constitution = read_constitution(tmp)
        data = constitution.to_dict()
        data["dedup"] = {**(data["dedup"] or {}), **{k: v for k, v in updates.items() if v is not None}}
        atomic_write_json(tmp / CONSTITUTION_FILE, data)
        out = Constitution.from_dict(data)

    replace_dir(build, member_dir, lock=member_dir.parent / LOCK_FILE)
    assert out is not None
    return out


# --- reading -----------------------------------------------------------------------------------------
def read_constitution(member_dir: Path) -> Constitution:
    return parse_constitution(read_constitution_bytes(member_dir), member_dir)


def read_constitution_bytes(member_dir: Path) -> bytes:
    return read_bytes(live_dir(member_dir) / CONSTITUTION_FILE, "dedup_constitution.json")


def parse_constitution(raw: bytes, member_dir: Path) -> Constitution:
    return Constitution.from_dict(parse_json(raw, member_dir / CONSTITUTION_FILE, "dedup_constitution.json"))


def _version(member_dir: Path) -> tuple[bytes, int, int] | None:
    """What identifies the member version being read: its constitution and the folder itself (each
    swap puts a new folder in place, so A → B → A between two looks is not taken for "unchanged")."""
    try:
        folder = live_dir(member_dir).stat()
        return read_constitution_bytes(member_dir), folder.st_ino, folder.st_ctime_ns
    except (StoreFormatError, OSError):
        return None


def read_consistently(member_dir: Path, read: Callable[[Path, Constitution], T]) -> T:
    """``read(folder, constitution)`` over one version of a member that writers may swap meanwhile.

    Member folders are replaced whole, so a reader that started on one version may open files of
    the next one. The constitution names everything else (rows, and the extras' digest), so when it
    is byte-identical before and after the read, everything read belongs to that version; when it
    changed, or the read failed because files changed under it, the read starts again."""
    for _ in range(READ_ATTEMPTS):
        before = _version(member_dir)
        raw = before[0] if before is not None else read_constitution_bytes(member_dir)  # raises the typed error
        try:
            result = read(live_dir(member_dir), parse_constitution(raw, member_dir))
        except (HfDpDedupError, OSError):
            if _version(member_dir) == before:
                raise  # nothing changed: a real error
            continue
        if _version(member_dir) == before:
            return result
    raise MemberChangedError(
        f"Member {member_dir} was replaced {READ_ATTEMPTS} times while it was being read (another process "
        "is re-adding it). Load it again once that writer is done."
    )


def open_member_store(member_dir: Path, constitution: Constitution, store_dir: Path | None = None) -> BlockStore:
    """Open the block store a member names (or ``store_dir``), checking it is the same store."""
    if store_dir is None:
        if constitution.block_store.path is None:
            raise StoreFormatError(
                f"Member {member_dir} names its block store only by Hub repo "
                f"{constitution.block_store.repo_id!r}: load it by repo id, or pass store_dir=."
            )
        store_dir = (member_dir.parent / member_name(member_dir) / constitution.block_store.path).resolve()
    store = BlockStore.open(store_dir)
    if store.store_id != constitution.block_store.store_id:
        raise StoreMismatchError(
            f"Member {member_dir.name} belongs to block store {constitution.block_store.store_id}, but "
            f"{store_dir} is store {store.store_id}. Point it at its own store (keep the family folder "
            "together, or pass the right store path)."
        )
    if store.block_size != constitution.block_size or store.index.dtype != constitution.dtype:
        raise StoreMismatchError(
            f"Member {member_dir.name} expects {constitution.dtype} blocks of size "
            f"{constitution.block_size}, but {store_dir} has {store.index.dtype} blocks of size "
            f"{store.block_size}; the member or the store is damaged."
        )
    return store


def load_member_state_dict(
    member_dir: Path, constitution: Constitution, store: BlockStore, *, verify: bool = True
) -> dict[str, torch.Tensor]:
    """The member's full state dict. A tensor whose rows are one ascending run in one shard, used
    by no other tensor, is a zero-copy view of the (memory-mapped, copy-on-write) shard; the others
    are gathered into memory of their own, so distinct tensors never alias each other."""
    rows = np.asarray(constitution.all_rows, dtype=np.int64)
    shards = store.shards_for_rows(rows)
    matrices = store.read_shards(shards, verify=verify)
    starts = np.array(sorted(matrices), dtype=np.int64)
    uses = np.bincount(rows, minlength=store.index.total_rows) if rows.size else rows
    out: dict[str, torch.Tensor] = {}
    with store.row_files(shards, verify=verify) as files:
        mapper = RowMapper(files, store.block_size, store.dtype)
        for entry in constitution.tensors:
            exclusive = bool((uses[list(entry.rows)] == 1).all())
            gathered = _gather(entry.rows, starts, matrices, store, exclusive, mapper)
            out[entry.name] = tensor_from_rows(gathered, entry.shape)
    if constitution.packed:
        out.update(unpack_extras(out.pop(PACKED_EXTRAS), constitution.packed))
    out.update(read_extras_file(member_dir, constitution, verify))
    missing = [c for c in constitution.aliases.values() if c not in out]
    if missing:
        raise ConstitutionError(f"Aliases point at tensors {missing} that the member does not hold.")
    for alias, canonical in constitution.aliases.items():
        out[alias] = out[canonical]
    return out


def _gather(
    rows: tuple[int, ...],
    starts: np.ndarray,
    matrices: dict[int, torch.Tensor],
    store: BlockStore,
    may_view: bool,
    mapper: RowMapper | None = None,
) -> torch.Tensor:
    """A tensor's ``[n, block_size]`` rows: a view of the mapped shard when they are one run of it
    (and ``may_view``), else the runs mapped from the shard files into one range (``mapper``, see
    :mod:`.remap`: no copy), else the runs copied into memory of its own."""
    ids = np.asarray(rows, dtype=np.int64)
    shard_of = starts[np.searchsorted(starts, ids, side="right") - 1]
    first = int(shard_of[0])
    if may_view and (shard_of == first).all() and (np.diff(ids) == 1).all():
        local = int(ids[0]) - first
        return matrices[first][local : local + len(ids)]
    # One concatenation of the runs of consecutive rows, written straight into the output: a single
    # kernel, no temporary (an index_select + index_copy_ pair writes every byte twice).
    breaks = np.flatnonzero((np.diff(ids) != 1) | (np.diff(shard_of) != 0)) + 1
    begins, ends = np.concatenate(([0], breaks)), np.concatenate((breaks, [len(ids)]))
    spans = list(zip(shard_of[begins].tolist(), (ids[begins] - shard_of[begins]).tolist(), (ends - begins).tolist()))
    mapped = mapper.gather(spans, len(ids)) if mapper is not None else None
    if mapped is not None:
        return mapped
    runs = [matrices[start][local : local + n] for start, local, n in spans]
    return torch.cat(runs, out=empty_rows(len(ids), store.block_size, store.dtype))


_HUGE_PAGE = 2 * 1024 * 1024


def empty_rows(n: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised ``[n, width]`` tensor in memory of its own. Large ones are anonymous memory
    advised for transparent huge pages: filling them then takes a few page faults instead of one per
    4 KiB, which is most of the cost of gathering a scattered member (measured 3-7x faster for 90 MB
    on this box). Where huge pages are unavailable it is ordinary memory."""
    nbytes = n * width * dtype.itemsize
    if nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(n, width, dtype=dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype, count=n * width).view(n, width)


def member_name(member_dir: Path) -> str:
    """The member's own name, also for its fallback-swap backup folder (``.<name>.old``)."""
    name = member_dir.name
    return name[1:-4] if name.startswith(".") and name.endswith(".old") else name


def read_extras_file(member_dir: Path, constitution: Constitution, verify: bool) -> dict[str, torch.Tensor]:
    """All extras of a member, each in its own memory. The file is read once and the very bytes
    that were checked are the ones parsed (no window between checking and reading)."""
    path = member_dir / EXTRAS_FILE
    try:
        with open(path, "rb") as fh:
            ident = file_identity(os.fstat(fh.fileno()), path)
            raw = fh.read()
    except FileNotFoundError:
        raise StoreFormatError(f"{EXTRAS_FILE} is missing from {member_dir}; {RESAVE}.") from None
    except OSError as exc:
        raise StoreFormatError(f"{path} cannot be read ({describe_os_error(exc)}).") from None
    if verify:
        check_buffer(raw, ident, path, sha256=constitution.extras_sha256, xxh3=constitution.extras_xxh3,
                     what="extras file")
    try:  # copies (extras are small): own, aligned memory, like any freshly allocated tensor
        tensors = {k: v.clone() for k, v in load_safetensors(raw).items()}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise StoreFormatError(f"{path} is not a readable safetensors file ({exc}); {RESAVE}.") from None
    if set(tensors) != set(constitution.extras):
        raise ConstitutionError(
            f"{EXTRAS_FILE} holds {sorted(set(tensors) ^ set(constitution.extras))[:5]} unlike the "
            f"constitution's extras list; {RESAVE}."
        )
    return tensors
