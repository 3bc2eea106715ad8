"""Row hashes: how a writer addresses stored rows by content, derived from the shards that hold them.

A writer appending a model must know which of its blocks are stored already: it looks the sha256 of
each block up among the stored rows' sha256. Indexes of format ``hf_dpdedup/1`` and ``/2`` list those
hashes (64 hex digits per row: the largest part of a small family's metadata, and of the index every
load downloads and parses at LLM scale). An index of format ``hf_dpdedup/3`` lists shards only.
A shard's row hashes are a function of its content, so writers derive them when they first need
them and keep them in a machine-local cache:

- ``<cache>/<key>.sha256`` holds the 32-byte sha256 of each row of one shard, in row order.
  ``<key>`` is the content digest the index records for the shard: the decoded rows' sha256 of a
  coded shard, the file's sha256 of a raw one. Named by content, a cache file is right for every
  store that holds that shard, and never stale.
- ``<cache>`` is ``$HF_DPDEDUP_ROW_HASH_CACHE``, else ``$XDG_CACHE_HOME/hf_dpdedup/row_hashes``
  (default ``~/.cache/hf_dpdedup/row_hashes``). ``off`` switches the cache off: each new writer
  process then hashes every shard once.
- The index records, per shard, the sha256 of its row hashes (``row_hashes_sha256``: 64 hex digits
  per shard instead of per row). A cache file is used only if it matches it; one that does not is
  deleted and the hashes derived again from the (verified) shard, and derived hashes that do not
  match it mean the index or the shard is damaged. A writer also still compares every row it
  reuses byte for byte with its shard (``BlockStore.add_rows``).
- Readers (loads, the Hub, the serving pool) never need row hashes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch

from ..blocks import BlockRows
from ..errors import StoreFormatError
from .format import RESTORE_INDEX, ShardInfo
from .io import atomic_write_bytes, user_cache_dir

CACHE_ENV = "HF_DPDEDUP_ROW_HASH_CACHE"
DIGEST_BYTES = 32


def row_hashes(rows: torch.Tensor | BlockRows) -> list[str]:
    """sha256 of each row's raw bytes (dtype-exact: bf16 rows are hashed as their 2-byte words).
    ``rows`` is a ``[n, block_size]`` matrix or :class:`~hf_dpdedup.blocks.BlockRows` (hashed row by
    row, no copy of the whole)."""
    if isinstance(rows, BlockRows):
        return [hashlib.sha256(rows.row(i).contiguous().view(torch.uint8).numpy()).hexdigest()
                for i in range(len(rows))]
    raw = rows.detach().contiguous().view(torch.uint8).numpy()
    return [hashlib.sha256(row).hexdigest() for row in raw]


def content_key(shard: ShardInfo) -> str:
    """The digest that names a shard's rows: of the decoded rows where recorded, else of the file."""
    return shard.raw_sha256 or shard.sha256


def cache_dir() -> Path | None:
    """The row-hash cache folder, or ``None`` when it is switched off."""
    return user_cache_dir(CACHE_ENV, "row_hashes")


def _path(shard: ShardInfo) -> Path | None:
    folder = cache_dir()
    return None if folder is None else folder / f"{content_key(shard)}.sha256"


def _packed(digests: Sequence[str]) -> bytes:
    return b"".join(bytes.fromhex(d) for d in digests)


def listing_digest(digests: Sequence[str]) -> str:
    """The sha256 of a shard's row hashes, 32 bytes each in row order (``row_hashes_sha256``)."""
    return hashlib.sha256(_packed(digests)).hexdigest()


def derive(shard: ShardInfo, rows: torch.Tensor, store: Path) -> list[str]:
    """The row hashes of ``rows`` (the shard's ``[num_rows, block_size]`` rows, from the block store at
    ``store``), checked against the ``row_hashes_sha256`` its index records, where it records one."""
    digests = row_hashes(rows)
    if shard.row_hashes_sha256 is not None and listing_digest(digests) != shard.row_hashes_sha256:
        raise StoreFormatError(
            f"Shard {shard.file} of the block store at {store} holds rows whose hashes do not match the "
            f"'row_hashes_sha256' its index records; {RESTORE_INDEX}."
        )
    return digests


def cached(shard: ShardInfo) -> list[str] | None:
    """The shard's row hashes from the cache, if they match the index's ``row_hashes_sha256``;
    ``None`` when absent or unreadable. A file that does not match is deleted."""
    path = _path(shard)
    if path is None or shard.row_hashes_sha256 is None:
        return None
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if len(raw) != shard.num_rows * DIGEST_BYTES or hashlib.sha256(raw).hexdigest() != shard.row_hashes_sha256:
        path.unlink(missing_ok=True)
        return None
    return [raw[i : i + DIGEST_BYTES].hex() for i in range(0, len(raw), DIGEST_BYTES)]


def remember(shard: ShardInfo, digests: Sequence[str]) -> None:
    """Cache the shard's row hashes; a cache that cannot be written (read-only, full) costs only time."""
    path = _path(shard)
    if path is None:
        return
    try:
        atomic_write_bytes(path, _packed(digests))
    except OSError:
        return
