"""A family folder: one block store shared by several member folders.

```
family/
  block_store/             block_store.json + blocks-NNNNN.safetensors
  members/<name>/          config.json, tokenizer files, dedup_constitution.json, extras.safetensors
  dedup_config.json        the DedupConfig it was deduplicated with (written by deduplicate_family)
```
This is the local twin of the Hub layout (one block-store repo plus one repo per member).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from ..errors import StoreFormatError
from ..privacy.metadata import PrivacyMetadata
from .adapter import adapter_record, base_config, is_peft_model
from .block_store import BlockStore
from .codec import Codec
from .constitution import Constitution, StoreRef
from .format import CONSTITUTION_FILE, DEDUP_CONFIG_FILE, INDEX_FILE
from .format import LOCK_FILE
from .io import atomic_write_json, live_dir, replace_dir
from .member import DedupRecordSource, MemberSource, check_member_name, member_name, read_constitution, write_member

STORE_DIR = "block_store"
MEMBERS_DIR = "members"


class FamilyStore:
    """Create with :meth:`create`, open with :meth:`open`; add models with :meth:`add_model`."""

    def __init__(self, root: Path, blocks: BlockStore) -> None:
        self.root = root
        self.blocks = blocks

    @classmethod
    def create(
        cls,
        root: str | os.PathLike,
        *,
        block_size: int = 65536,
        dtype: torch.dtype | str = torch.float32,
        codec: Codec | str = Codec.NONE,
    ) -> "FamilyStore":
        """A new family folder. ``codec="zipnn"`` entropy-codes the block shards (lossless; smaller
        on disk and on the Hub, decoded on load); the default ``"none"`` keeps raw shards, which
        load as zero-copy memory maps."""
        root = Path(root)
        return cls(root, BlockStore.create(root / STORE_DIR, block_size=block_size, dtype=dtype, codec=codec))

    @classmethod
    def open(cls, root: str | os.PathLike) -> "FamilyStore":
        root = Path(root)
        return cls(root, BlockStore.open(root / STORE_DIR))

    @classmethod
    def is_family(cls, path: str | os.PathLike) -> bool:
        return (Path(path) / STORE_DIR / INDEX_FILE).is_file()

    def member_path(self, name: str) -> Path:
        return self.root / MEMBERS_DIR / check_member_name(name)

    def members(self) -> list[str]:
        folder = self.root / MEMBERS_DIR
        if not folder.is_dir():
            return []
        return sorted(
            name for name in {member_name(p) for p in folder.iterdir()}
            if not name.startswith(".") and (live_dir(folder / name) / CONSTITUTION_FILE).is_file()
        )

    def constitution(self, name: str) -> Constitution:
        return read_constitution(self.member_path(name))

    def add_model(
        self,
        name: str,
        model: Any,
        *,
        tokenizer: Any | None = None,
        files_from: str | os.PathLike | None = None,
        privacy: PrivacyMetadata | None = None,
        dedup: DedupRecordSource = None,
    ) -> Constitution:
        """Store ``model`` (a transformers model, a peft ``PeftModel``, or a state dict with
        ``files_from`` a model folder) as member ``name``: only rows not stored yet are appended.
        Re-adding a name replaces it.

        A ``PeftModel`` becomes an *adapter member*: its whole state dict is stored (the base's rows
        are shared with every member on the same base), with the adapter config and the base class
        in the constitution and ``adapter_config.json`` + the base's ``config.json`` in the folder;
        ``DedupedModel.from_pretrained`` gives it back as a ``PeftModel``."""
        adapter = None
        if is_peft_model(model):
            adapter = adapter_record(model)
            state_dict, config, architecture = model.state_dict(), base_config(model), adapter.base_model_class
        elif isinstance(model, Mapping):
            state_dict, config, architecture = model, None, None
            if files_from is None:
                raise TypeError("A bare state dict needs files_from= (a model folder with config.json).")
        else:
            state_dict, architecture = model.state_dict(), type(model).__name__
            # as save_pretrained does: the saved config names the class that was saved
            config = copy.deepcopy(model.config)
            config.architectures = [architecture]
        source = MemberSource(config=config, files_from=Path(files_from) if files_from else None, tokenizer=tokenizer)
        return write_member(
            self.blocks,
            self.member_path(name),
            name,
            state_dict,
            source,
            architecture=architecture,
            privacy=privacy,
            dedup=dedup,
            adapter=adapter,
        )

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Record the deduplication config of this family (a JSON-ready dict, as
        ``DedupConfig.to_dict()`` gives it) in ``dedup_config.json`` (atomically; replaces any)."""
        atomic_write_json(self.root / DEDUP_CONFIG_FILE, dict(config))

    def read_config(self) -> dict[str, Any] | None:
        """The dict :meth:`write_config` recorded (``DedupConfig.from_dict`` rebuilds the config), or
        None for a family without one (built with ``add_model`` alone)."""
        path = self.root / DEDUP_CONFIG_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreFormatError(f"{path} cannot be read as JSON ({exc}): delete it (the family's members "
                                   "do not depend on it) or restore it from a copy.") from None
        if not isinstance(data, dict):
            raise StoreFormatError(f"{path} holds {type(data).__name__}, not a config object: delete it or "
                                   "restore it from a copy.")
        return data

    def recode(self, dest: str | os.PathLike, *, codec: Codec | str) -> "FamilyStore":
        """Copy this family to a new folder ``dest`` whose block store is coded with ``codec``.

        Row ids stay the same, so each member's constitution changes only in the store it names.
        Shards are copied one at a time; every member folder is swapped in complete, so an
        interrupted copy is a smaller valid family: delete ``dest`` and run it again.

        Example:
            >>> small = FamilyStore.open("family").recode("family-zipnn", codec="zipnn")
        """
        source = self.blocks
        target = FamilyStore.create(dest, block_size=source.block_size, dtype=source.index.dtype, codec=codec)
        row_bytes = source.block_size * source.dtype.itemsize
        for shard in source.index.shards:
            rows = source.read_shards([shard])[shard.first_row]
            ids = target.blocks.add_rows(rows, max_shard_bytes=shard.num_rows * row_bytes)
            if ids != list(range(shard.first_row, shard.end_row)):
                raise StoreFormatError(
                    f"Shard {shard.file} of {source.path} holds rows that are stored twice: the store is "
                    "damaged, so its members cannot be recoded; rebuild the family from the models."
                )
        for name in self.members():
            target._copy_member(live_dir(self.member_path(name)), name)
        config = self.read_config()
        if config is not None:
            target.write_config(config)
        return target

    def _copy_member(self, member_dir: Path, name: str) -> None:
        final = self.member_path(name)
        ref = StoreRef(self.blocks.store_id, path=os.path.relpath(self.blocks.path.resolve(), final.resolve()))
        constitution = replace(read_constitution(member_dir), block_store=ref)

        def build(tmp: Path) -> None:
            for f in sorted(member_dir.iterdir()):
                if f.is_file() and f.name != CONSTITUTION_FILE:
                    shutil.copy2(f, tmp / f.name)
            atomic_write_json(tmp / CONSTITUTION_FILE, constitution.to_dict())

        replace_dir(build, final, lock=final.parent / LOCK_FILE)

    def stored_bytes(self) -> int:
        """Every byte the family keeps: shards, index and all member folders."""
        members = sum(
            f.stat().st_size
            for name in self.members()
            for f in live_dir(self.member_path(name)).iterdir()
            if f.is_file()
        )
        return self.blocks.stored_bytes() + members


@contextmanager
def staged_family_folder(out: str | os.PathLike, *,
                         before_publish: Callable[[], None] | None = None) -> Iterator[Path]:
    """A hidden staging folder next to ``out`` to build a whole family in; renamed to ``out`` when
    the block succeeds (after ``before_publish()``, e.g. a barrier of every process), removed when
    it fails. ``out`` must be new or an empty folder: a family is never half-written or overwritten.
    Members name their block store by a relative path, so the rename keeps them loadable."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise StoreFormatError(f"{out} exists and is not empty; choose a new folder for the family store.")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:12]}"
    try:
        yield staging
        if before_publish is not None:
            before_publish()
        os.replace(staging, out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
