"""The block store: content-addressed rows of a ``[rows, block_size]`` matrix in safetensors shards.

Rows are addressed by the sha256 of their bytes, so a block that is already stored (from another
model, or elsewhere in the same model) is never stored twice: this is the exact, lossless first
tier of deduplication. Appending writes new shards first and then swaps in the new index, so a
crash at any point leaves the previous index, and every row it names, readable.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import struct
import uuid
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open

from ..blocks import check_block_size, dtype_name, parse_dtype
from ..errors import ConstitutionError, DtypeMismatchError, StoreFormatError
from .codec import Codec, encode_rows
from .decoded_cache import load_decoded
from .format import (
    CODED_FORMAT,
    FORMAT,
    INDEX_FILE,
    LOCK_FILE,
    SHARD_TENSOR,
    ShardInfo,
    StoreIndex,
    shard_file_name,
)
from .io import atomic_write, atomic_write_json, read_json, sha256_bytes, sha256_file, verify_files

DEFAULT_MAX_SHARD_BYTES = 64 * 1024 * 1024


def row_hashes(matrix: torch.Tensor) -> list[str]:
    """sha256 of each row's raw bytes (dtype-exact: bf16 rows are hashed as their 2-byte words)."""
    raw = matrix.detach().contiguous().view(torch.uint8).numpy()
    return [hashlib.sha256(row).hexdigest() for row in raw]


class BlockStore:
    """A folder of block shards plus ``block_store.json``. Open with :meth:`open` or :meth:`create`."""

    def __init__(self, path: Path, index: StoreIndex) -> None:
        self.path = path
        self.index = index
        self._row_of_hash: dict[str, int] | None = None

    # --- opening ---------------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        block_size: int,
        dtype: torch.dtype | str,
        codec: Codec | str = Codec.NONE,
    ) -> "BlockStore":
        """A new, empty store; ``codec`` (see :class:`~.codec.Codec`) is how its shards are coded."""
        path = Path(path)
        check_block_size(block_size)
        codec = Codec.parse(codec)
        dtype = dtype if isinstance(dtype, str) else dtype_name(dtype)
        parse_dtype(dtype)
        if (path / INDEX_FILE).exists():
            raise StoreFormatError(
                f"A block store already exists at {path}; open it with BlockStore.open to add models."
            )
        index = StoreIndex(store_id=uuid.uuid4().hex, block_size=block_size, dtype=dtype, codec=codec)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path / INDEX_FILE, index.to_dict())
        return cls(path, index)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "BlockStore":
        path = Path(path)
        return cls(path, StoreIndex.from_dict(read_json(path / INDEX_FILE, f"block_store.json of {path}")))

    @property
    def block_size(self) -> int:
        return self.index.block_size

    @property
    def dtype(self) -> torch.dtype:
        return parse_dtype(self.index.dtype)

    @property
    def codec(self) -> Codec:
        return self.index.codec

    @property
    def store_id(self) -> str:
        return self.index.store_id

    def row_of_hash(self, digest: str) -> int | None:
        if self._row_of_hash is None:
            self._row_of_hash = {}
            for row, h in enumerate(self.index.row_hashes):
                self._row_of_hash.setdefault(h, row)
        return self._row_of_hash.get(digest)

    # --- writing ---------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time; the index is re-read under the lock so no append is lost."""
        with open(self.path / LOCK_FILE, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                fresh = BlockStore.open(self.path)
                self.index, self._row_of_hash = fresh.index, None
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def add_rows(
        self,
        matrix: torch.Tensor,
        *,
        groups: Sequence[int] | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> list[int]:
        """Store the rows of ``matrix`` that are not stored yet; return the row id of every input row.

        ``groups`` (row counts summing to ``len(matrix)``, e.g. the blocks of each tensor) keeps the
        new rows of one group inside one shard where they fit, so loading can map them zero-copy.
        """
        self._check_matrix(matrix)
        groups = list(groups) if groups is not None else [matrix.shape[0]]
        if sum(groups) != matrix.shape[0]:
            raise StoreFormatError(f"groups sum to {sum(groups)} but the matrix has {matrix.shape[0]} rows.")
        digests = row_hashes(matrix)
        with self._locked():
            ids, new_rows, new_groups = self._assign_rows(digests, groups)
            if new_rows:
                self._append(matrix, new_rows, new_groups, [digests[i] for i in new_rows], max_shard_bytes)
        return ids

    def _check_matrix(self, matrix: torch.Tensor) -> None:
        if matrix.dim() != 2 or matrix.shape[1] != self.block_size:
            raise StoreFormatError(
                f"Rows must be a [n, {self.block_size}] matrix for this store, got {list(matrix.shape)}."
            )
        if matrix.dtype != self.dtype:
            raise DtypeMismatchError(
                f"This block store holds {self.index.dtype} blocks but the model is "
                f"{dtype_name(matrix.dtype)}. A family has one block dtype: convert the model with "
                f"model.to(torch.{self.index.dtype}) or use a separate store."
            )

    def _assign_rows(
        self, digests: list[str], groups: list[int]
    ) -> tuple[list[int], list[int], list[int]]:
        ids: list[int] = []
        new_rows: list[int] = []  # positions in the input matrix
        new_groups: list[int] = []
        pending: dict[str, int] = {}
        next_id = self.index.total_rows
        position = 0
        for size in groups:
            fresh = 0
            for i in range(position, position + size):
                row = self.row_of_hash(digests[i])
                if row is None:
                    row = pending.get(digests[i])
                if row is None:
                    row = pending[digests[i]] = next_id
                    next_id += 1
                    new_rows.append(i)
                    fresh += 1
                ids.append(row)
            if fresh:
                new_groups.append(fresh)
            position += size
        return ids, new_rows, new_groups

    def _append(
        self,
        matrix: torch.Tensor,
        new_rows: list[int],
        new_groups: list[int],
        new_digests: list[str],
        max_shard_bytes: int,
    ) -> None:
        row_bytes = self.block_size * matrix.element_size()
        max_rows = max(1, max_shard_bytes // row_bytes)
        rows = matrix[torch.tensor(new_rows, dtype=torch.long)]
        shards = list(self.index.shards)
        start = 0
        for count in _pack(new_groups, max_rows):
            number = len(shards) + 1
            name = shard_file_name(number)
            raw = rows[start : start + count]
            chunk = encode_rows(raw, self.codec)
            meta = {"format": FORMAT, "first_row": str(self.index.total_rows + start)}
            raw_sha256 = None
            if self.codec is not Codec.NONE:
                meta.update(format=CODED_FORMAT, codec=self.codec.value)
                raw_sha256 = sha256_bytes(raw.contiguous().view(torch.uint8).numpy())
            atomic_write(self.path / name, lambda tmp, c=chunk: save_shard(tmp, c, meta))
            path = self.path / name
            first = self.index.total_rows + start
            shards.append(ShardInfo(name, first, count, path.stat().st_size, sha256_file(path), raw_sha256))
            start += count
        index = replace(self.index, shards=tuple(shards), row_hashes=self.index.row_hashes + tuple(new_digests))
        index.validate()
        # The switch: until this rename the old index (and everything it names) is what readers see.
        atomic_write_json(self.path / INDEX_FILE, index.to_dict())
        self.index, self._row_of_hash = index, None

    # --- reading ---------------------------------------------------------------------------------
    def shards_for_rows(self, rows: Sequence[int] | np.ndarray) -> list[ShardInfo]:
        """The shards holding ``rows``; raises :class:`ConstitutionError` for rows that don't exist."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 0:
            return []
        bad = rows[(rows < 0) | (rows >= self.index.total_rows)]
        if bad.size:
            raise ConstitutionError(
                f"The constitution names block row {int(bad[0])} but the block store at {self.path} has "
                f"rows 0..{self.index.total_rows - 1}. The member belongs to a newer or different "
                "store: load it with the store revision it was written against."
            )
        starts = np.array([s.first_row for s in self.index.shards], dtype=np.int64)
        used = np.unique(np.searchsorted(starts, rows, side="right") - 1)
        return [self.index.shards[i] for i in used]

    def read_shards(self, shards: Sequence[ShardInfo], *, verify: bool = True) -> dict[int, torch.Tensor]:
        """Map each shard's ``first_row`` to its ``[num_rows, block_size]`` tensor: memory-mapped for
        raw shards, decoded for coded ones (once per machine: see :mod:`.decoded_cache`)."""
        if self.codec is not Codec.NONE:
            return {s.first_row: self._decoded(s, verify) for s in shards}
        if verify:
            verify_files((self.path / s.file, s.sha256, "block shard") for s in shards)
        out: dict[int, torch.Tensor] = {}
        for shard in shards:
            tensor = _load_shard_tensor(self.path / shard.file)
            if tuple(tensor.shape) != (shard.num_rows, self.block_size) or tensor.dtype != self.dtype:
                raise StoreFormatError(
                    f"Shard {shard.file} holds a {dtype_name(tensor.dtype)} tensor of shape "
                    f"{list(tensor.shape)}, but the index expects {self.index.dtype} "
                    f"[{shard.num_rows}, {self.block_size}]; the store is damaged."
                )
            out[shard.first_row] = tensor
        return out

    def _decoded(self, shard: ShardInfo, verify: bool) -> torch.Tensor:
        path = self.path / shard.file
        return load_decoded(
            shard,
            lambda: _load_shard_tensor(path),
            path,
            codec=self.codec,
            block_size=self.block_size,
            dtype=self.dtype,
            verify=verify,
        )

    def stored_bytes(self) -> int:
        return sum(s.bytes for s in self.index.shards) + (self.path / INDEX_FILE).stat().st_size


def _pack(groups: list[int], max_rows: int) -> list[int]:
    """Row counts per shard: whole groups while they fit, oversized groups split at ``max_rows``."""
    shards: list[int] = []
    current = 0
    for size in groups:
        if current and current + size > max_rows:
            shards.append(current)
            current = 0
        while size > max_rows:
            shards.append(max_rows)
            size -= max_rows
        current += size
    if current:
        shards.append(current)
    return shards


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8"}
ALIGNMENT = 64


def save_shard(path: Path, rows: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write ``rows`` as a safetensors file whose tensor data starts at a 64-byte boundary.

    This is the safetensors byte format (8-byte header length, JSON header padded with spaces,
    raw little-endian data), written directly because the alignment matters: loaded tensors are
    views of the memory-mapped file, and CPU matrix kernels round differently for operands at
    different addresses modulo 16 bytes. Aligned views compute exactly like freshly allocated
    tensors, so a rebuilt model's outputs are bit-identical to the in-memory original's.
    """
    rows = rows.contiguous()
    data = rows.view(torch.uint8).numpy()
    header = {
        "__metadata__": metadata,
        SHARD_TENSOR: {
            "dtype": _SAFETENSORS_DTYPES[rows.dtype],
            "shape": list(rows.shape),
            "data_offsets": [0, data.nbytes],
        },
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGNMENT)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.write(memoryview(data.reshape(-1)))


def _load_shard_tensor(path: Path) -> torch.Tensor:
    try:
        with safe_open(path, framework="pt") as fh:
            if SHARD_TENSOR not in fh.keys():
                raise StoreFormatError(f"Shard {path.name} has no tensor named {SHARD_TENSOR!r}.")
            return fh.get_tensor(SHARD_TENSOR)
    except StoreFormatError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise StoreFormatError(
            f"Shard {path} is not a readable safetensors file ({exc}); copy or download it again."
        ) from exc
