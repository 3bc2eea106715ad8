"""Crash-safe file writes and checksum verification.

Every file of a store is written to a temporary name in the same folder, flushed to disk and then
renamed over its final name, so a reader sees either the old file or the new one, never half of
one. Folders (member folders) are built under a temporary name and swapped in the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import ChecksumMismatchError, StoreFormatError

_CHUNK = 16 * 1024 * 1024


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_path)`` then rename ``tmp_path`` over ``path`` (same folder, so atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Read a JSON object, turning a missing or malformed file into a :class:`StoreFormatError`."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise StoreFormatError(f"{what} not found at {path}: is this an hf_dpdedup folder?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreFormatError(
            f"{what} at {path} is not valid JSON ({exc}); the file is damaged: restore it from the "
            "original store or the Hub."
        ) from None
    if not isinstance(data, dict):
        raise StoreFormatError(f"{what} at {path} must hold a JSON object, got {type(data).__name__}.")
    return data


def replace_dir(build: Callable[[Path], None], final: Path) -> None:
    """Build a folder under a temporary name with ``build(tmp)`` and swap it in for ``final``.

    If ``final`` exists it is moved aside first and deleted only after the new folder is in place,
    so at any instant one complete version is reachable under ``final`` or its backup.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    backup = final.with_name(f".{final.name}.old")
    try:
        build(tmp)
        if final.exists():
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(final, backup)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(backup, ignore_errors=True)


# --- verification ------------------------------------------------------------------------------------
# A file is hashed once per process per version of it (path, inode, size, mtime): any rewrite of the
# file gives it a new identity and it is hashed again. The cache only ever holds files that passed.
_verified: set[tuple] = set()
_verified_lock = threading.Lock()


def _identity(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


def verify_file(path: str | os.PathLike, expected_sha256: str, *, what: str = "file") -> None:
    """Raise :class:`ChecksumMismatchError` unless the file's sha256 is ``expected_sha256``."""
    path = Path(path)
    if not path.is_file():
        raise StoreFormatError(
            f"{what} {path.name} is missing from {path.parent}: the store is incomplete; "
            "copy or download it again."
        )
    ident = _identity(path)
    with _verified_lock:
        if ident + (expected_sha256,) in _verified:
            return
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise ChecksumMismatchError(
            f"{what} {path} is corrupted or truncated: sha256 {actual[:16]}… but the index records "
            f"{expected_sha256[:16]}…. Delete it and copy or download it again."
        )
    with _verified_lock:
        _verified.add(ident + (expected_sha256,))


def verify_files(items: Iterable[tuple[Path, str, str]]) -> None:
    """Verify several ``(path, sha256, what)`` at once; hashing runs in threads (it frees the GIL)."""
    items = list(items)
    if len(items) <= 1:
        for path, sha, what in items:
            verify_file(path, sha, what=what)
        return
    with ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1)) as pool:
        for future in [pool.submit(verify_file, p, s, what=w) for p, s, w in items]:
            future.result()


def mark_verified(path: str | os.PathLike, sha256: str) -> None:
    """Record that ``path``, as it is now, has ``sha256`` (checked by the caller, e.g. from a record
    of an earlier check that is tied to the same file identity), so reads skip hashing it again."""
    ident = _identity(Path(path))
    with _verified_lock:
        _verified.add(ident + (sha256,))


def forget_verified() -> None:
    """Drop the per-process verification cache (next reads hash every file again)."""
    with _verified_lock:
        _verified.clear()
