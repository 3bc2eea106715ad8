"""Crash-safe file writes, folder swaps, writer locks and checksum verification.

Every file of a store is written to a temporary name in the same folder, flushed to disk and then
renamed over its final name, so a reader sees either the old file or the new one, never half of
one. Folders (member folders) are built under a temporary name and swapped in with one atomic
``renameat2(RENAME_EXCHANGE)`` where the platform has it; elsewhere the old folder is moved to a
backup name first, and readers and the next writer recover from that backup (:func:`live_dir`).

Two digests: sha256 (recorded in indexes, checked where bytes arrive: written or downloaded) and
xxh3-128 (a fast non-cryptographic digest recorded next to it, ~7x faster than sha256 here, checked
on every load of bytes this process has not checked yet). See docs/architecture.md, "Guarantees".
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import xxhash

from ..errors import ChecksumMismatchError, StoreFormatError

_CHUNK = 16 * 1024 * 1024


def _digest_file(path: str | os.PathLike, digest: Any) -> str:
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return _digest_file(path, hashlib.sha256())


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def fast_digest(data: bytes | memoryview | Any) -> str:
    """xxh3-128 of a buffer (bytes, memoryview, mmap): the cheap load-time check."""
    return xxhash.xxh3_128_hexdigest(data)


def fast_digest_file(path: str | os.PathLike) -> str:
    return _digest_file(path, xxhash.xxh3_128())


_CACHE_OFF = {"off", "0", "false", "no"}


def user_cache_dir(env: str, name: str) -> Path | None:
    """A machine-local cache folder: ``$<env>`` if set (``off`` switches the cache off: ``None``),
    else ``$XDG_CACHE_HOME/hf_dpdedup/<name>`` (default ``~/.cache/hf_dpdedup/<name>``)."""
    configured = os.environ.get(env)
    if configured is not None:
        return None if configured.strip().lower() in _CACHE_OFF else Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hf_dpdedup" / name


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


def json_text(obj: Any, indent: int = 2) -> str:
    """JSON with objects and lists of objects indented, every list of scalars (or of scalars and
    lists of scalars, such as row ids with ``[first, count]`` runs) on one line, and each object in
    a list whose values are all such (a tensor entry, a shard entry) on a line of its own.

    Indexes and constitutions are mostly long lists of row ids and row hashes, and lists of small
    records; ``json.dumps(..., indent=2)`` puts each value on its own indented line, which made them
    2-3 times their content (the metadata of a small family outweighed its deduplicated rows). Any
    JSON reader reads both.
    """
    def scalar(value: Any) -> bool:
        return not isinstance(value, (dict, list, tuple))

    def flat(value: Any) -> bool:  # a list of scalars
        return isinstance(value, (list, tuple)) and all(scalar(v) for v in value)

    def inline(value: Any) -> bool:  # a scalar, or a list of scalars and lists of scalars
        return scalar(value) or (isinstance(value, (list, tuple)) and all(scalar(v) or flat(v) for v in value))

    def one_line(value: Any) -> str:
        return json.dumps(list(value) if isinstance(value, tuple) else value, separators=(",", ":"))

    def key(k: Any) -> str:  # as json.dumps writes a key (non-strings become their JSON text)
        return json.dumps(k if isinstance(k, str) else json.dumps(k))

    def encode(value: Any, level: int, in_list: bool = False) -> str:
        inner, outer = " " * (indent * (level + 1)), " " * (indent * level)
        if isinstance(value, dict):
            if not value:
                return "{}"
            if in_list and all(inline(v) for v in value.values()):
                return "{" + ", ".join(f"{key(k)}: {one_line(v)}" for k, v in value.items()) + "}"
            items = (f"{inner}{key(k)}: {encode(v, level + 1)}" for k, v in value.items())
            return "{\n" + ",\n".join(items) + "\n" + outer + "}"
        if isinstance(value, (list, tuple)) and not inline(value):
            return "[\n" + ",\n".join(inner + encode(v, level + 1, in_list=True) for v in value) + "\n" + outer + "]"
        return one_line(value)

    return encode(obj, 0)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json_text(obj) + "\n").encode())


def read_json(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """Read a JSON object, turning a missing or malformed file into a :class:`StoreFormatError`."""
    return parse_json(read_bytes(path, what), path, what)


def read_bytes(path: str | os.PathLike, what: str) -> bytes:
    """A store file's bytes; a missing, unreadable or non-file path is a :class:`StoreFormatError`."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise StoreFormatError(
            f"{what} not found at {path}: is this an hf_dpdedup folder? Pass a family, block store or "
            "member folder (or restore the file from the Hub or a backup)."
        ) from None
    except OSError as exc:
        raise StoreFormatError(f"{what} at {path} cannot be read ({describe_os_error(exc)}).") from None


def describe_os_error(exc: OSError) -> str:
    """An OSError in words plus what to do about it (used by every store read)."""
    if isinstance(exc, PermissionError):
        return f"{exc.strerror}: give this user read access to it (chmod/chown) and retry"
    if isinstance(exc, IsADirectoryError):
        return "it is a folder, not a file: the folder is damaged; restore the file from the Hub or a backup"
    return f"{type(exc).__name__}: {exc.strerror or exc}; check the disk and retry"


def parse_json(raw: bytes, path: str | os.PathLike, what: str) -> dict[str, Any]:
    try:
        data = json.loads(raw.decode())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreFormatError(
            f"{what} at {path} is not valid JSON ({exc}); the file is damaged: restore it from the "
            "original store or the Hub."
        ) from None
    if not isinstance(data, dict):
        raise StoreFormatError(
            f"{what} at {path} must hold a JSON object, got {type(data).__name__}: the file is damaged; "
            "restore it from the original store or the Hub."
        )
    return data


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock_path`` (created if needed): one writer at a time, across
    processes. The kernel drops the lock when its holder dies, so a killed writer never leaves a
    stale lock."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def remove_stale_temps(folder: Path) -> None:
    """Delete temporaries (``.*.tmp``) that killed writers left in ``folder``. Call it only under the
    folder's writer lock: every live temporary of that folder belongs to the lock holder."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    platform or file system cannot (the caller then falls back to two renames)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def backup_dir(final: Path) -> Path:
    """Where the two-rename fallback of :func:`replace_dir` keeps the previous folder meanwhile."""
    return final.with_name(f".{final.name}.old")


def live_dir(final: Path) -> Path:
    """``final``, or its backup while a fallback swap is half done (or was killed half done)."""
    backup = backup_dir(final)
    if not final.exists() and backup.is_dir():
        return backup
    return final


def recover_dir(final: Path) -> None:
    """Finish what a killed fallback swap left: restore a lone backup, drop a superseded one.
    Call under the folder's writer lock."""
    backup = backup_dir(final)
    if backup.is_dir():
        if final.exists():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(backup, final)


def replace_dir(build: Callable[[Path], None], final: Path, *, lock: Path) -> None:
    """Build a folder under a unique temporary name with ``build(tmp)`` and swap it in for ``final``.

    Runs under the writer lock ``lock`` (so swaps of one folder never race, and stale temporaries of
    killed writers are removed first). The swap is one atomic exchange where the platform has one,
    so ``final`` always names a complete version, whatever instant a writer is killed at; elsewhere
    the old folder is renamed to a backup first and :func:`live_dir` / :func:`recover_dir` cover the
    instant between the two renames."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with locked(lock):
        remove_stale_temps(final.parent)
        recover_dir(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            build(tmp)
            _fsync_tree(tmp)
            if final.exists() and exchange(tmp, final):
                _fsync_dir(final.parent)
            else:
                if final.exists():
                    os.replace(final, backup_dir(final))
                os.replace(tmp, final)
                _fsync_dir(final.parent)
                shutil.rmtree(backup_dir(final), ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # after an exchange: the previous version


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


# --- verification ------------------------------------------------------------------------------------
# A file is hashed once per process per version of it (inode, size, mtime *and* ctime): any write to
# the file (even one that restores its mtime with utime) changes its ctime, so it is hashed again.
# The cache only ever holds files that passed.
_verified: set[tuple] = set()
_verified_lock = threading.Lock()


def file_identity(st: os.stat_result, path: str | os.PathLike) -> tuple:
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _identity(path: Path) -> tuple:
    return file_identity(path.stat(), path)


def is_verified(ident: tuple, digest: str) -> bool:
    with _verified_lock:
        return ident + (digest,) in _verified


def remember_verified(ident: tuple, digest: str) -> None:
    with _verified_lock:
        _verified.add(ident + (digest,))


def is_checked(ident: tuple, *, sha256: str, xxh3: str | None) -> bool:
    """Whether this process checked this very file version against the digest :func:`check_buffer`
    uses for it (xxh3-128 where one is recorded, else sha256)."""
    return is_verified(ident, xxh3 or sha256)


def check_buffer(data: Any, ident: tuple, path: Path, *, sha256: str, xxh3: str | None, what: str) -> None:
    """Check bytes already in memory (or mapped) against their recorded digest: xxh3-128 where one is
    recorded, else sha256; skipped when this process checked this very file version before."""
    digest, expected = ("xxh3_128", xxh3) if xxh3 else ("sha256", sha256)
    if is_checked(ident, sha256=sha256, xxh3=xxh3):
        return
    actual = fast_digest(data) if xxh3 else sha256_bytes(data)
    if actual != expected:
        raise ChecksumMismatchError(
            f"{what} {path} is corrupted or truncated: {digest} {actual[:16]}… but the index records "
            f"{expected[:16]}…. Delete it and copy or download it again."
        )
    remember_verified(ident, expected)


def verify_file(path: str | os.PathLike, expected_sha256: str, *, what: str = "file") -> None:
    """Raise :class:`ChecksumMismatchError` unless the file's sha256 is ``expected_sha256``."""
    path = Path(path)
    if not path.is_file():
        raise StoreFormatError(
            f"{what} {path.name} is missing from {path.parent}: the store is incomplete; "
            "copy or download it again."
        )
    try:
        ident = _identity(path)
        if is_verified(ident, expected_sha256):
            return
        actual = sha256_file(path)
    except OSError as exc:
        raise StoreFormatError(f"{what} {path} cannot be read ({describe_os_error(exc)}).") from None
    if actual != expected_sha256:
        raise ChecksumMismatchError(
            f"{what} {path} is corrupted or truncated: sha256 {actual[:16]}… but the index records "
            f"{expected_sha256[:16]}…. Delete it and copy or download it again."
        )
    remember_verified(ident, expected_sha256)


def mark_verified(path: str | os.PathLike, sha256: str) -> None:
    """Record that ``path``, as it is now, has ``sha256`` (checked by the caller, e.g. from a record
    of an earlier check that is tied to the same file identity), so reads skip hashing it again."""
    remember_verified(_identity(Path(path)), sha256)


def forget_verified() -> None:
    """Drop the per-process verification cache (next reads hash every file again)."""
    with _verified_lock:
        _verified.clear()
