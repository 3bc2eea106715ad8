"""Resolve members and block stores on the Hub, through ``huggingface_hub``'s cache.

A member repo is small (config, tokenizer files, ``dedup_constitution.json``, ``extras.safetensors``,
``README.md``): it is fetched whole with ``snapshot_download``. Its constitution names the block
store repo and a *pinned commit sha*; from that commit only ``block_store.json`` and the shards
holding the member's rows are fetched (``hf_hub_download`` per file). Files are addressed by commit
sha, so a shard shared by several members is downloaded once and then served from the cache, and
``HF_HUB_OFFLINE=1`` / ``local_files_only=True`` work from the cache alone. huggingface_hub writes
each download to a temporary ``.incomplete`` file and renames it, so a cut download never leaves a
half file in the cache. Shards are checked against the sha256 the store index records, once per
cached blob (see :func:`verify_cached`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import (
    ChecksumMismatchError,
    HubAuthError,
    HubChecksumError,
    HubDownloadError,
    HubFileNotFoundError,
    HubOfflineError,
    HubRepoNotFoundError,
    PinnedRevisionError,
)
from ..store.block_store import BlockStore
from ..store.constitution import Constitution, StoreRef
from ..store.format import CONSTITUTION_FILE, INDEX_FILE, ShardInfo
from ..store.io import atomic_write_json, mark_verified, verify_file
from .retry import retry_call, status_of

# huggingface_hub 2.x speaks httpx2, 1.x httpx: catch whichever transport errors it can raise
TRANSPORT_ERRORS = tuple(
    importlib.import_module(m).HTTPError for m in ("httpx2", "httpx") if importlib.util.find_spec(m)
)
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
DOWNLOAD_ATTEMPTS = 3  # tries per store file on HTTP 429 / 5xx before HubDownloadError
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubOptions:
    """The ``from_pretrained`` keywords that reach huggingface_hub (same meaning as there)."""

    revision: str | None = None
    cache_dir: str | Path | None = None
    token: str | bool | None = None
    local_files_only: bool = False
    force_download: bool = False
    endpoint: str | None = None

    def common(self) -> dict:
        return {
            "cache_dir": self.cache_dir,
            "token": self.token,
            "local_files_only": self.local_files_only,
            "force_download": self.force_download,
            "endpoint": self.endpoint,
        }


def is_repo_id(name: str) -> bool:
    """``namespace/name`` (what the Hub calls a repo id), as opposed to a local path."""
    return bool(_REPO_ID.match(name)) and ".." not in name


def download_member(repo_id: str, options: HubOptions, *, subfolder: str = "") -> Path:
    """The member repo's snapshot folder in the cache (downloaded if needed); with ``subfolder``,
    only that folder of the repo."""
    where = f"member repo {repo_id!r}" + (f" at revision {options.revision!r}" if options.revision else "")
    patterns = [f"{subfolder.strip('/')}/*"] if subfolder else None
    with hub_errors(where, repo_id):
        folder = Path(snapshot_download(repo_id, revision=options.revision, allow_patterns=patterns,
                                        **options.common()))
    if not (folder / subfolder / CONSTITUTION_FILE).is_file():
        raise HubFileNotFoundError(
            f"Hub repo {repo_id!r} has no {CONSTITUTION_FILE}: it is not an hf_dpdedup member. Load plain "
            "models with transformers (AutoModel.from_pretrained), or check the repo id (members are "
            "pushed with hf_dpdedup.push_family_to_hub / `hf-dpdedup push`)."
        )
    return folder


def fetch_store(constitution: Constitution, options: HubOptions, *, verify: bool = True) -> Path:
    """Download ``block_store.json`` and the shards the member needs, at the pinned commit; verify
    them; return the (partial) store snapshot folder, which opens as an ordinary store folder."""
    ref = constitution.block_store
    revision = pinned_revision(ref, constitution.name)
    where = f"block store repo {ref.repo_id!r} at commit {revision}"

    def get(filename: str) -> Path:
        with hub_errors(where, ref.repo_id, pinned=revision):
            return Path(retry_call(  # a transient 5xx / 429 on one shard is retried, a few times
                lambda: hf_hub_download(ref.repo_id, filename, revision=revision, **options.common()),
                what=f"downloading {filename} of {ref.repo_id}", attempts=DOWNLOAD_ATTEMPTS))

    folder = get(INDEX_FILE).parent
    store = BlockStore.open(folder)
    shards = store.shards_for_rows(constitution.all_rows)
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(shards)))) as pool:
        list(pool.map(get, [s.file for s in shards]))
    if verify:
        try:
            verify_cached(folder, shards)
        except ChecksumMismatchError as exc:
            raise HubChecksumError(
                f"{exc} It came from {where}: the corrupt copy was removed from the cache, so loading "
                "again (a plain retry, or force_download=True) downloads it afresh; if that fails too, the "
                "store repo itself is damaged: re-push the family (`hf-dpdedup push`)."
            ) from exc
    return folder


VERIFIED_DIR = "hf_dpdedup-verified"


def verify_cached(folder: Path, shards: list[ShardInfo]) -> None:
    """Check each shard's sha256 once per cached blob, not once per process, where bytes arrive.

    huggingface_hub writes a blob once (download to a temporary file, then rename) and never rewrites
    it in place, so a blob whose identity (inode, size, mtime, ctime) is unchanged still has the bytes
    that were hashed. A small marker per verified blob, in the repo's cache folder beside ``blobs/``
    (where huggingface_hub keeps its own ``trees/`` and ``.no_exist/``), records that identity; a later
    process trusts a matching marker and hashes only blobs that are new or changed (loads still run
    the cheap xxh3 check over the mapped bytes). The marker is named after the snapshot link's target
    (the blob's etag) and records the identity of the file behind every link, so it is found also
    when the blob itself links elsewhere (Xet's shared store). A shard that fails is evicted from the
    cache (snapshot link and blob), so a plain retry downloads it again."""
    failures: list[ChecksumMismatchError] = []
    for shard in shards:
        path = folder / shard.file
        record = _read_marker(path)
        if record is not None and record == _marker_record(path, shard.sha256):
            mark_verified(path, shard.sha256)
            continue
        try:
            verify_file(path, shard.sha256, what="block shard")
        except ChecksumMismatchError as exc:
            failures.append(exc)
            _evict(path)
            continue
        _write_marker(path, shard.sha256)
    if failures:
        raise failures[0]


def _evict(path: Path) -> None:
    """Remove a cached file: the blob behind the snapshot link, the link, and its marker."""
    with contextlib.suppress(OSError):
        os.unlink(path.resolve())
    with contextlib.suppress(OSError):
        os.unlink(path)
    marker = _marker_path(path)
    if marker is not None:
        marker.unlink(missing_ok=True)


def _marker_path(path: Path) -> Path | None:
    # only for files in a huggingface_hub cache (snapshots/<commit>/<file> links); a copy has none
    if not path.is_symlink() or path.parent.parent.name != "snapshots":
        return None
    return path.parent.parent.parent / VERIFIED_DIR / Path(os.readlink(path)).name


def _marker_record(path: Path, sha256: str) -> dict:
    st = path.stat()
    return {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino, "dev": st.st_dev}


def _read_marker(path: Path) -> dict | None:
    marker = _marker_path(path)
    try:
        return json.loads(marker.read_text()) if marker is not None else None
    except (OSError, ValueError):
        return None


def _write_marker(path: Path, sha256: str) -> None:
    marker = _marker_path(path)
    if marker is None:
        return
    try:
        atomic_write_json(marker, _marker_record(path, sha256))
    except OSError:  # a read-only cache: verification just happens again next time
        pass


def pinned_revision(ref: StoreRef, member: str) -> str:
    if ref.repo_id is None:
        raise PinnedRevisionError(
            f"Member {member!r} came from the Hub but names no block store repo (a downloaded member never "
            "reads a local block store path); re-push it with `hf-dpdedup push`, or pass store_dir=."
        )
    if not is_repo_id(ref.repo_id):
        raise PinnedRevisionError(
            f"Member {member!r} names block store repo {ref.repo_id!r}, which is not a Hub repo id "
            "(namespace/name); the member is damaged: re-push the family with `hf-dpdedup push`."
        )
    if ref.revision is None or not COMMIT_SHA.match(ref.revision):
        raise PinnedRevisionError(
            f"Member {member!r} points at block store revision {ref.revision!r} of {ref.repo_id!r}, which is "
            "not a commit sha: a branch moves, so the member could load blocks it was not built from. "
            "Re-push the family with `hf-dpdedup push` (it pins the store's commit sha)."
        )
    return ref.revision


@contextlib.contextmanager
def hub_errors(where: str, repo_id: str, *, pinned: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub / network errors into typed errors that say what to do next."""
    try:
        yield
    except RevisionNotFoundError as exc:
        if pinned is not None:
            raise PinnedRevisionError(
                f"The {where} does not exist any more (its history was rewritten or the repo re-created), "
                "and it is not in the local cache. Re-push the family with `hf-dpdedup push` so its members "
                "pin an existing store commit, or ask the repo owner."
            ) from exc
        raise HubRepoNotFoundError(f"The {where} does not exist: check the revision (branch, tag or commit sha).") from exc
    except GatedRepoError as exc:
        raise HubAuthError(f"The {where} is gated: request access on the Hub, then pass token=.") from exc
    except RepositoryNotFoundError as exc:
        raise HubRepoNotFoundError(
            f"No local folder and no Hub repo for the {where}. Check the spelling; a private repo needs "
            "token= (or `hf auth login`); a local member folder must contain dedup_constitution.json."
        ) from exc
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        cause = _http_cause(exc)
        if cause is not None and not isinstance(exc, OfflineModeIsEnabled):
            # huggingface_hub falls back to the cache when the Hub answers with an error, and says
            # "not cached" when that fails too: the real problem is the Hub's answer, not offline mode
            raise HubDownloadError(
                f"The Hub failed while resolving the {where} ({type(cause).__name__}: {cause}) and it is "
                "not in the local cache. Nothing partial was kept; run the same call again (the Hub may "
                "be having trouble: retry later)."
            ) from exc
        raise HubOfflineError(
            f"The {where} is not in the local cache and the Hub cannot be used (offline mode "
            "HF_HUB_OFFLINE=1 or local_files_only=True, or the Hub is unreachable). Load it once online "
            "(unset HF_HUB_OFFLINE), or pass the right cache_dir=."
        ) from exc
    except EntryNotFoundError as exc:
        raise HubFileNotFoundError(
            f"The {where} lacks a file the member needs ({exc.__class__.__name__}): the repo is incomplete. "
            "Re-push the family with `hf-dpdedup push`."
        ) from exc
    except HfHubHTTPError as exc:
        status = status_of(exc)
        if status in (401, 403):
            raise HubAuthError(
                f"The Hub refused access to the {where} (HTTP {status}): pass a token with read access "
                "(token=... or `hf auth login`)."
            ) from exc
        raise HubDownloadError(
            f"Downloading the {where} failed (HTTP {status}): {exc}. Nothing partial was kept in the cache; "
            "run the same call again to resume."
        ) from exc
    except (*TRANSPORT_ERRORS, OSError) as exc:
        if isinstance(exc, (ChecksumMismatchError, HubOfflineError)):
            raise
        raise HubDownloadError(
            f"Downloading the {where} failed midway ({type(exc).__name__}: {exc}). Nothing partial was "
            "kept in the cache; run the same call again to resume (files already complete are reused)."
        ) from exc


def _http_cause(exc: BaseException) -> BaseException | None:
    """The HTTP or network error behind ``exc`` (its ``__cause__``/``__context__`` chain), if any."""
    seen = exc.__cause__ or exc.__context__
    while seen is not None:
        if isinstance(seen, (HfHubHTTPError, *TRANSPORT_ERRORS)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
