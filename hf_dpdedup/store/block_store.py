"""The block store: content-addressed rows of a ``[rows, block_size]`` matrix in safetensors shards.

Rows are addressed by the sha256 of their bytes, so a block that is already stored (from another
model, or elsewhere in the same model) is never stored twice: this is the exact, lossless first
tier of deduplication. Writers derive the stored rows' hashes from the shards
(:mod:`.row_digests`; stores of format ``/1`` and ``/2`` list them in the index). Appending writes
new shards first and then swaps in the new index, so a crash at any point leaves the previous
index, and every row it names, readable.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from safetensors import safe_open

from ..blocks import BlockRows, as_block_rows, check_block_size, dtype_name, parse_dtype
from ..errors import ChecksumMismatchError, ConstitutionError, DtypeMismatchError, StoreFormatError
from .codec import Codec, encode_rows
from . import row_digests
from .decoded_cache import load_decoded
from .remap import RowFile, mappable
from .remap import available as can_map_rows
from .row_digests import row_hashes
from .format import (
    CODED_FORMAT,
    FORMAT,
    INDEX_FILE,
    LOCK_FILE,
    RESTORE_INDEX,
    SHARD_TENSOR,
    ShardInfo,
    StoreIndex,
    shard_file_name,
)
from .io import (
    atomic_write,
    atomic_write_json,
    check_buffer,
    describe_os_error,
    fast_digest_file,
    file_identity,
    is_checked,
    locked,
    read_json,
    remove_stale_temps,
    sha256_bytes,
    sha256_file,
)

DEFAULT_MAX_SHARD_BYTES = 64 * 1024 * 1024
_COMPARE_CHUNK_BYTES = 64 * 1024 * 1024  # rows re-read at a time when reused rows are checked


class BlockStore:
    """A folder of block shards plus ``block_store.json``. Open with :meth:`open` or :meth:`create`."""

    def __init__(self, path: Path, index: StoreIndex) -> None:
        self.path = path
        self.index = index
        self._row_of_hash: dict[str, int] | None = None
        #: row hashes of shards by content key (:func:`.row_digests.content_key`): never stale
        self._digests: dict[str, list[str]] = {}

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
            for row, h in enumerate(self.stored_row_hashes()):
                self._row_of_hash.setdefault(h, row)
        return self._row_of_hash.get(digest)

    def stored_row_hashes(self) -> list[str]:
        """The sha256 of every stored row, in row order: listed by a ``/1`` or ``/2`` index, else
        derived from the shards (this process's memory, the machine cache, or hashing the verified
        shard: see :mod:`.row_digests`)."""
        if self.index.row_hashes is not None:
            return list(self.index.row_hashes)
        return [h for shard in self.index.shards for h in self._shard_row_hashes(shard)]

    def _shard_row_hashes(self, shard: ShardInfo) -> list[str]:
        key = row_digests.content_key(shard)
        if key not in self._digests:
            digests = row_digests.cached(shard)
            if digests is None:
                digests = row_digests.derive(shard, self.read_shards([shard], verify=True)[shard.first_row], self.path)
                row_digests.remember(shard, digests)
            self._digests[key] = digests
        return self._digests[key]

    # --- writing ---------------------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time; the index is re-read under the lock so no append is lost, and
        temporaries of writers killed earlier are removed."""
        with locked(self.path / LOCK_FILE):
            remove_stale_temps(self.path)
            fresh = BlockStore.open(self.path)
            self.index, self._row_of_hash = fresh.index, None
            yield

    def add_rows(
        self,
        matrix: torch.Tensor | BlockRows,
        *,
        groups: Sequence[int] | None = None,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ) -> list[int]:
        """Store the rows of ``matrix`` that are not stored yet; return the row id of every input row.

        ``matrix`` is a ``[n, block_size]`` tensor or :class:`~hf_dpdedup.blocks.BlockRows` (a model's
        blocks as views: only one shard's new rows are ever copied at a time).

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
            if not self._reused_rows_match(matrix, ids, set(new_rows)):
                raise StoreFormatError(
                    f"block_store.json at {self.path} records row hashes that do not match the rows its "
                    f"shards hold; {RESTORE_INDEX}. Nothing was written."
                )
            if new_rows:
                self._append(matrix, new_rows, new_groups, [digests[i] for i in new_rows], max_shard_bytes)
        return ids

    def _check_matrix(self, matrix: torch.Tensor | BlockRows) -> None:
        if len(matrix.shape) != 2 or matrix.shape[1] != self.block_size:
            raise StoreFormatError(
                f"Rows must be a [n, {self.block_size}] matrix for this store, got {list(matrix.shape)}."
            )
        if matrix.dtype != self.dtype:
            raise DtypeMismatchError(
                f"This block store holds {self.index.dtype} blocks but the model is "
                f"{dtype_name(matrix.dtype)}. A family has one block dtype: convert the model with "
                f"model.to(torch.{self.index.dtype}) or use a separate store."
            )

    def _reused_rows_match(self, matrix: torch.Tensor | BlockRows, ids: list[int], new_rows: set[int]) -> bool:
        """Whether the rows matched by hash hold exactly the input's bytes: damaged row hashes (an
        index's list or a cache file with hashes swapped or edited) would otherwise map blocks of the
        new model to wrong rows."""
        reused = [i for i in range(len(ids)) if i not in new_rows and ids[i] < self.index.total_rows]
        if not reused:
            return True
        stored = np.asarray([ids[i] for i in reused], dtype=np.int64)
        # No whole-shard digest here: it would read (and keep mapped) every byte of every shard that
        # holds a reused row — another model's worth at LLM scale. The rows are compared byte for
        # byte below, which is what this check is for; loads verify the shards themselves.
        matrices = self.read_shards(self.shards_for_rows(stored), verify=False)
        starts = np.array(sorted(matrices), dtype=np.int64)
        shard_of = starts[np.searchsorted(starts, stored, side="right") - 1]
        rows = as_block_rows(matrix)
        step = max(1, _COMPARE_CHUNK_BYTES // (self.block_size * self.dtype.itemsize))
        for lo in range(0, len(reused), step):  # a chunk of rows at a time, never a model's worth
            wanted = rows.take(reused[lo : lo + step])
            index = torch.from_numpy(stored[lo : lo + step] - shard_of[lo : lo + step])
            got = torch.stack([matrices[int(s)][int(i)] for s, i in zip(shard_of[lo : lo + step], index)])
            if not torch.equal(got.view(torch.uint8), wanted.view(torch.uint8)):
                return False
        return True

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
        matrix: torch.Tensor | BlockRows,
        new_rows: list[int],
        new_groups: list[int],
        new_digests: list[str],
        max_shard_bytes: int,
    ) -> None:
        row_bytes = self.block_size * matrix.dtype.itemsize
        max_rows = max(1, max_shard_bytes // row_bytes)
        rows = as_block_rows(matrix)
        shards = list(self.index.shards)
        derived = self.index.row_hashes is None
        start = 0
        for count in _pack(new_groups, max_rows):
            number = len(shards) + 1
            name = shard_file_name(number)
            raw = rows.take(new_rows[start : start + count])  # one shard's rows at a time
            chunk = encode_rows(raw, self.codec)
            meta = {"format": FORMAT, "first_row": str(self.index.total_rows + start)}
            raw_sha256 = None
            if self.codec is not Codec.NONE:
                meta.update(format=CODED_FORMAT, codec=self.codec.value)
                raw_sha256 = sha256_bytes(raw.contiguous().view(torch.uint8).numpy())
            atomic_write(self.path / name, lambda tmp, c=chunk: save_shard(tmp, c, meta))
            path = self.path / name
            first = self.index.total_rows + start
            digests = new_digests[start : start + count]
            shards.append(
                ShardInfo(name, first, count, path.stat().st_size, sha256_file(path), raw_sha256,
                          xxh3_128=fast_digest_file(path),
                          row_hashes_sha256=row_digests.listing_digest(digests) if derived else None)
            )
            if derived:  # named by content: right even if the index switch below never happens
                self._digests[row_digests.content_key(shards[-1])] = digests
                row_digests.remember(shards[-1], digests)
            start += count
        listed = None if derived else self.index.row_hashes + tuple(new_digests)
        index = replace(self.index, shards=tuple(shards), row_hashes=listed)
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
        """Map each shard's ``first_row`` to its ``[num_rows, block_size]`` tensor: memory-mapped
        (copy-on-write) for raw shards, decoded for coded ones (once per machine: see
        :mod:`.decoded_cache`). With ``verify`` the mapped bytes of a raw shard are checked before
        any tensor is made of them (no window between checking a file and reading it)."""
        shards = list(shards)
        if self.codec is not Codec.NONE:
            return {s.first_row: self._decoded(s, verify) for s in shards}
        if len(shards) <= 1:
            tensors = [self._map_shard(s, verify) for s in shards]
        else:  # hashing frees the GIL: check several shards at once
            with ThreadPoolExecutor(max_workers=min(len(shards), os.cpu_count() or 1)) as pool:
                tensors = list(pool.map(lambda s: self._map_shard(s, verify), shards))
        return {s.first_row: t for s, t in zip(shards, tensors)}

    @contextmanager
    def row_files(self, shards: Sequence[ShardInfo], *, verify: bool = True) -> Iterator[dict[int, RowFile]]:
        """The shards among ``shards`` whose rows can be mapped straight from their files (see
        :mod:`.remap`), open while the block runs, keyed by ``first_row``: raw shards whose rows are
        whole pages at a page-aligned offset and, with ``verify``, only file versions this process
        has checked (:meth:`read_shards` checks them first). Others are left out: read them from
        :meth:`read_shards`' tensors."""
        files: dict[int, RowFile] = {}
        try:
            if self.codec is Codec.NONE and can_map_rows():
                for shard in shards:
                    opened = self._row_file(shard, verify)
                    if opened is not None:
                        files[shard.first_row] = opened
            yield files
        finally:
            for opened in files.values():
                os.close(opened.fd)

    def _row_file(self, shard: ShardInfo, verify: bool) -> RowFile | None:
        path = self.path / shard.file
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            ident = file_identity(os.fstat(fd), path)
            if verify and not is_checked(ident, sha256=shard.sha256, xxh3=shard.xxh3_128):
                raise ValueError("not the version that was checked")
            (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
            begin = int(json.loads(os.pread(fd, length, 8))[SHARD_TENSOR]["data_offsets"][0])
            offset = 8 + length + begin
            if not mappable(offset, self.block_size * self.dtype.itemsize):
                raise ValueError("rows are not whole pages")
        except (OSError, ValueError, KeyError, TypeError, struct.error):
            os.close(fd)
            return None
        return RowFile(fd, offset)

    def _map_shard(self, shard: ShardInfo, verify: bool) -> torch.Tensor:
        path = self.path / shard.file
        mapped, ident = _map_file(path)
        if verify:
            if len(mapped) != shard.bytes:
                raise ChecksumMismatchError(
                    f"block shard {path} is truncated or extended: {len(mapped)} bytes but the index "
                    f"records {shard.bytes}. Delete it and copy or download it again."
                )
            check_buffer(mapped, ident, path, sha256=shard.sha256, xxh3=shard.xxh3_128, what="block shard")
        return _shard_tensor(mapped, path, shard, self.block_size, self.dtype)

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
PAGE_ALIGNMENT = 4096


def data_alignment(rows: torch.Tensor) -> int:
    """Where a shard's data starts: a 4 KiB page boundary when its rows are whole pages (so a
    scattered member's rows can be mapped straight from the file, see :mod:`.remap`), else 64 bytes."""
    row_bytes = rows.shape[-1] * rows.element_size() if rows.dim() == 2 else 0
    return PAGE_ALIGNMENT if row_bytes and row_bytes % PAGE_ALIGNMENT == 0 else ALIGNMENT


def save_shard(path: Path, rows: torch.Tensor, metadata: dict[str, str]) -> None:
    """Write ``rows`` as a safetensors file whose tensor data starts at an aligned boundary
    (:func:`data_alignment`: 64 bytes, or a page).

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
    raw += b" " * (-(8 + len(raw)) % data_alignment(rows))
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.write(memoryview(data.reshape(-1)))


def _load_shard_tensor(path: Path) -> torch.Tensor:
    """The ``blocks`` tensor of a coded shard (1-D bytes, decoded by :mod:`.decoded_cache`)."""
    try:
        with safe_open(path, framework="pt") as fh:
            if SHARD_TENSOR not in fh.keys():
                raise StoreFormatError(f"Shard {path.name} has no tensor named {SHARD_TENSOR!r}; copy or download it again.")
            return fh.get_tensor(SHARD_TENSOR)
    except StoreFormatError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise StoreFormatError(
            f"Shard {path} is not a readable safetensors file ({exc}); copy or download it again."
        ) from exc


_TORCH_DTYPES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def _map_file(path: Path) -> tuple[mmap.mmap | bytes, tuple]:
    """A copy-on-write mapping of ``path`` and the identity of the very file that was mapped."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            ident = file_identity(st, path)
            if st.st_size == 0:
                return b"", ident
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY), ident
    except FileNotFoundError:
        raise StoreFormatError(
            f"block shard {path.name} is missing from {path.parent}: the store is incomplete; "
            "copy or download it again."
        ) from None
    except OSError as exc:
        raise StoreFormatError(f"block shard {path} cannot be read ({describe_os_error(exc)}).") from None


def _shard_tensor(
    mapped: mmap.mmap | bytes, path: Path, shard: ShardInfo, block_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """The ``blocks`` tensor of a mapped shard, after checking its safetensors header against the
    index entry (the header records the shard's first row, so an entry naming another shard's file
    is refused even when that file is intact)."""
    damaged = f"Shard {path} is not a readable block shard"
    fix = "copy or download it again"
    try:
        (length,) = struct.unpack("<Q", mapped[:8])
        header = json.loads(bytes(mapped[8 : 8 + length]).decode())
        info = header[SHARD_TENSOR]
        begin, end = (int(x) for x in info["data_offsets"])
        meta = header.get("__metadata__") or {}
    except Exception as exc:  # any malformed header: struct, JSON, missing keys
        raise StoreFormatError(f"{damaged} ({type(exc).__name__}: {exc}); {fix}.") from None
    tensor_dtype = _TORCH_DTYPES.get(info.get("dtype"))
    if tensor_dtype != dtype or list(info.get("shape", [])) != [shard.num_rows, block_size]:
        raise StoreFormatError(
            f"Shard {shard.file} holds a {info.get('dtype')} tensor of shape {info.get('shape')}, but "
            f"the index expects {dtype_name(dtype)} [{shard.num_rows}, {block_size}]; the store is damaged: "
            f"{fix}, or {RESTORE_INDEX}."
        )
    if meta.get("first_row", str(shard.first_row)) != str(shard.first_row):
        raise StoreFormatError(
            f"Shard file {shard.file} holds rows from {meta.get('first_row')}, but the index entry that "
            f"names it starts at row {shard.first_row}; {RESTORE_INDEX}."
        )
    start = 8 + length + begin
    if end - begin != shard.num_rows * block_size * dtype.itemsize or start + (end - begin) > len(mapped):
        raise StoreFormatError(f"{damaged} (its data does not fit the file); {fix}.")
    flat = torch.frombuffer(mapped, dtype=dtype, count=shard.num_rows * block_size, offset=start)
    return flat.view(shard.num_rows, block_size)
