"""Decode a coded shard once per machine: a local cache of decoded rows, memory-mapped on load.

A coded store is small where bytes cost (on disk, on the Hub, in downloads); decoding it on every
load would cost CPU time on every load. So the first load of a coded shard writes its decoded rows
to ``<cache>/<raw sha256>.rows`` (plain little-endian row bytes, written to a temporary name and
renamed), and later loads memory-map that file, as loads of raw shards do. This is what ZipNN's own
Hugging Face integration offers with ``replace_local_file=True``.

- ``<cache>`` is ``$HF_DPDEDUP_DECODED_CACHE``, else ``$XDG_CACHE_HOME/hf_dpdedup/decoded`` (default
  ``~/.cache/hf_dpdedup/decoded``). ``HF_DPDEDUP_DECODED_CACHE=off`` disables it (every load decodes).
- Files are named by the sha256 of the decoded rows that the store index records for the shard,
  and are checked against it like any shard (once per file version per process); a cache file that
  fails the check is deleted and the shard decoded again: the coded shard stays the reference.
- A cache that cannot be written (read-only, full disk) only costs speed: the load decodes in memory.
  Unverified loads (``verify=False``) neither write nor trust-mark cache files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from ..errors import ChecksumMismatchError
from .codec import Codec, decode_rows
from .format import ShardInfo
from .io import atomic_write, mark_verified, sha256_bytes, user_cache_dir, verify_file

CACHE_ENV = "HF_DPDEDUP_DECODED_CACHE"


def cache_dir() -> Path | None:
    """The decoded-shard cache folder, or ``None`` when it is switched off."""
    return user_cache_dir(CACHE_ENV, "decoded")


def load_decoded(
    shard: ShardInfo,
    read_stored: Callable[[], torch.Tensor],
    stored_path: Path,
    *,
    codec: Codec,
    block_size: int,
    dtype: torch.dtype,
    verify: bool,
) -> torch.Tensor:
    """The ``[num_rows, block_size]`` rows of a coded shard: mapped from the cache, or decoded from
    ``read_stored()`` (the shard's stored tensor at ``stored_path``, checked first) and cached."""
    numel = shard.num_rows * block_size
    cached = _cached_path(shard)
    if cached is not None and cached.is_file() and cached.stat().st_size == numel * dtype.itemsize:
        try:
            if verify:
                verify_file(cached, shard.raw_sha256, what="decoded shard")
            return torch.from_file(str(cached), shared=False, size=numel, dtype=dtype).view(shard.num_rows, block_size)
        except ChecksumMismatchError:
            cached.unlink(missing_ok=True)
    if verify:
        verify_file(stored_path, shard.sha256, what="block shard")
    rows = decode_rows(
        read_stored(), codec, num_rows=shard.num_rows, block_size=block_size, dtype=dtype, what=f"Shard {shard.file}"
    )
    if verify and shard.raw_sha256 is not None:
        # end to end: the decoded bytes are the ones the writer coded (also vouches for the cache file)
        decoded = sha256_bytes(rows.view(-1).view(torch.uint8).numpy())
        if decoded != shard.raw_sha256:
            raise ChecksumMismatchError(
                f"Shard {stored_path} decodes to rows with sha256 {decoded[:16]}… but the index records "
                f"{shard.raw_sha256[:16]}…; the shard or the index is damaged: copy or download the store again."
            )
        if cached is not None:
            _write(cached, rows, shard.raw_sha256)
    return rows


def _cached_path(shard: ShardInfo) -> Path | None:
    folder = cache_dir()
    if folder is None or shard.raw_sha256 is None:
        return None
    return folder / f"{shard.raw_sha256}.rows"


def _write(path: Path, rows: torch.Tensor, raw_sha256: str) -> None:
    try:
        atomic_write(path, lambda tmp: rows.view(-1).view(torch.uint8).numpy().tofile(tmp))
    except OSError:
        return  # the cache is an optimisation: a load never fails because of it
    mark_verified(path, raw_sha256)  # written from rows decoded out of a verified shard
