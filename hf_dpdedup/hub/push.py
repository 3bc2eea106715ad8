"""Push a family to the Hub: the block store repo first, then one repo per member.

Repo names: the block store goes to ``<namespace>/<family_name>-blocks`` (``family_name`` defaults
to the family folder's name) and member ``<name>`` to ``<namespace>/<family_name>-<name>``, so two
families with members of the same name never share a repo; names are checked with
``huggingface_hub``'s ``validate_repo_id``. A repo that already holds another block store (or a
member of another store, or a plain model) is never repointed unless ``force=True``. Each member's
``dedup_constitution.json`` is rewritten so its ``block_store`` is
``{"store_id", "path": null, "repo_id": "<namespace>/<family_name>-blocks", "revision": "<commit sha>"}``,
the store commit that was just pushed (or found up to date), never a branch.

Guarantees:

- **one commit per repo**, and only when something changed: each file is compared with the remote
  tree (git blob sha1 for regular files, sha256 for LFS/Xet files) first, so re-pushing an unchanged
  family makes no commit at all;
- **store first**: a member is pinned only to a store commit that exists and holds all of its rows
  (rows are append-only, so every later store commit holds them too);
- **atomic and resumable**: a commit applies all of its files or none, and ``parent_commit`` makes a
  concurrent push fail instead of being overwritten. After a failure midway every repo still holds its
  previous, loadable commit; running the same push again skips what is already up to date;
- **transient errors retried**: HTTP 429 / 5xx on creating a repo or committing are retried with
  backoff (honouring ``Retry-After``); each retry re-reads the remote tree first, so a commit whose
  answer was lost is not made twice (:mod:`hf_dpdedup.hub.retry`);
- **loads with plain transformers**: each member repo gets ``modeling_hf_dpdedup.py`` and an
  ``auto_map`` in its ``config.json`` (:mod:`hf_dpdedup.hub.remote`), so
  ``AutoModelFor<Task>.from_pretrained(repo, trust_remote_code=True)`` works without this package.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import validate_repo_id
from huggingface_hub.utils.sha import git_hash

from ..errors import HubAuthError, PushError, RepoCollisionError, RepoNameError, SeededPushError
from ..store.constitution import Constitution, StoreRef
from ..store.family import FamilyStore
from ..store.format import ADAPTER_CONFIG_FILE, CONSTITUTION_FILE, EXTRAS_FILE, INDEX_FILE
from ..store.member import check_member_name
from ..store.io import json_text
from .cards import is_seeded, member_card, store_card
from .download import TRANSPORT_ERRORS, is_repo_id
from .remote import REMOTE_CODE_FILE, config_with_auto_map, remote_code
from .retry import retry_call, status_of

logger = logging.getLogger(__name__)
FAMILY_INDEX_FILE = "family.json"  # in the block store repo: the members pushed and their repo ids

Source = bytes | Path


@dataclass(frozen=True)
class RepoPush:
    """One repo after a push: its head commit, and whether this push made that commit."""

    repo_id: str
    commit: str
    changed: bool
    files: tuple[str, ...] = ()  # the files this push uploaded


@dataclass(frozen=True)
class PushResult:
    store: RepoPush
    members: dict[str, RepoPush] = field(default_factory=dict)

    @property
    def commits_made(self) -> int:
        return int(self.store.changed) + sum(m.changed for m in self.members.values())


def store_repo_id(namespace: str, family_name: str) -> str:
    return check_repo_id(f"{namespace}/{family_name}-blocks")


def member_repo_id(namespace: str, family_name: str, member: str) -> str:
    """Where member ``member`` of family ``family_name`` is pushed: ``<namespace>/<family>-<member>``."""
    return check_repo_id(f"{namespace}/{family_name}-{member}")


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if huggingface_hub accepts it, else :class:`RepoNameError` saying how to fix it."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise RepoNameError(
            f"{repo_id!r} is not a valid Hub repo id ({exc}) Pick a namespace and family_name= (--family-name) "
            "of letters, digits, '-', '_' or '.', without '--' or '..', 96 characters at most in all."
        ) from None
    if "/" not in repo_id:
        raise RepoNameError(f"{repo_id!r} needs a namespace: pass the user or organisation that owns the repos.")
    return repo_id


def push_family_to_hub(
    store: FamilyStore | str | os.PathLike,
    namespace: str,
    *,
    family_name: str | None = None,
    members: Sequence[str] | None = None,
    private: bool = False,
    token: str | bool | None = None,
    endpoint: str | None = None,
    base_model: str | None = None,
    license: str | None = None,
    commit_message: str | None = None,
    force: bool = False,
    allow_seeded: bool = False,
) -> PushResult:
    """Push a family folder (block store + members) to ``namespace`` on the Hub.

    Args:
        store: a :class:`FamilyStore` or the path of a family folder.
        namespace: the user or organisation that will own the repos.
        family_name: the block store repo is ``<namespace>/<family_name>-blocks`` and member ``m``'s
            repo ``<namespace>/<family_name>-m`` (default: the family folder's name).
        members: push only these members (default: all).
        private: create new repos as private (existing repos keep their visibility).
        token: a token with write access to ``namespace`` (default: the saved login).
        endpoint: Hub URL (default ``HF_ENDPOINT`` or huggingface.co).
        base_model: Hub id of the pretrained model the family was fine-tuned from (model cards).
        license: license id for the model cards.
        allow_seeded: publish members whose training or dedup noise was seeded (tests, reproductions;
            their cards say "not a privacy guarantee"). Without it such members are refused.
        force: push even into repos that hold another block store or its members (they are
            repointed at this family's store; their old commits keep loading what they pinned).

    Raises:
        RepoNameError: a repo id huggingface_hub would refuse.
        RepoCollisionError: a target repo belongs to another block store (and ``force`` is off).
        SeededPushError: members built with seeded noise (and ``allow_seeded`` is off).
        HubAuthError, PushError: the Hub refused or failed; re-running the same push resumes.

    Example:
        >>> result = push_family_to_hub("family", "my-org", family_name="minilm-sst2")
        >>> result.members["eps4"].repo_id, result.store.commit
        ('my-org/minilm-sst2-eps4', '6f1c…')
    """
    family = store if isinstance(store, FamilyStore) else FamilyStore.open(store)
    family_name = check_member_name(family_name or family.root.resolve().name)
    names = list(members) if members is not None else family.members()
    for name in names:
        check_member_name(name)
    seeded = [name for name in names if is_seeded(family.constitution(name))]
    if seeded and not allow_seeded:
        raise SeededPushError(
            f"Members {seeded} were built with seeded noise (DPConfig(secure_mode=False) or "
            "DedupConfig(noise_seed=...)): anyone with the seed can remove it, so their ε is not a privacy "
            "guarantee. Retrain / deduplicate them with secure noise, or pass allow_seeded=True "
            "(--allow-seeded) to publish them marked as test-only."
        )
    api = HfApi(endpoint=endpoint, token=token)
    store_repo = store_repo_id(namespace, family_name)
    repo_ids = {name: member_repo_id(namespace, family_name, name) for name in names}
    message = commit_message or "Push with hf_dpdedup"

    index = family.blocks.index
    store_files: dict[str, Source] = {INDEX_FILE: family.blocks.path / INDEX_FILE}
    store_files.update({s.file: family.blocks.path / s.file for s in index.shards})
    store_files["README.md"] = str(store_card(index, repo_id=store_repo)).encode()
    # what DedupedFamily.from_pretrained("<namespace>/<family_name>") lists and loads
    store_files[FAMILY_INDEX_FILE] = (json.dumps({"store_id": index.store_id, "members": repo_ids}, indent=2,
                                                 sort_keys=True) + "\n").encode()
    hashes = {s.file: s.sha256 for s in index.shards}
    with push_errors(store_repo, pushed=[]):
        retry_call(lambda: ensure_repo(api, store_repo, private=private), what=f"creating {store_repo}")
        if not force:
            check_owner(api, store_repo, INDEX_FILE, index.store_id)
        store_push = retry_call(
            lambda: sync_repo(api, store_repo, store_files, f"{message}: block store", known_sha256=hashes),
            what=f"committing to {store_repo}")
    logger.info("block store %s at %s (%s)", store_repo, store_push.commit,
                "new commit" if store_push.changed else "up to date")

    family_stats = _family_stats(family)
    result = PushResult(store_push)
    for name in names:
        repo_id = repo_ids[name]
        with push_errors(repo_id, pushed=[store_repo, *(m.repo_id for m in result.members.values())]):
            retry_call(lambda: ensure_repo(api, repo_id, private=private), what=f"creating {repo_id}")
            if not force:
                check_owner(api, repo_id, CONSTITUTION_FILE, index.store_id)
            files = member_files(
                family, name, repo_id=repo_id, store_repo=store_repo, store_commit=store_push.commit,
                endpoint=api.endpoint, base_model=base_model, license=license, family_stats=family_stats,
            )
            result.members[name] = retry_call(
                lambda: sync_repo(api, repo_id, files, f"{message}: member {name}"), what=f"committing to {repo_id}")
        logger.info("member %s -> %s at %s", name, repo_id, result.members[name].commit)
    return result


def check_owner(api: HfApi, repo_id: str, record: str, store_id: str) -> None:
    """Refuse to push into ``repo_id`` if it holds another store's files (``record``: the file that
    names the store, ``block_store.json`` or ``dedup_constitution.json``) or a plain model."""
    head = api.repo_info(repo_id)
    files = {s.rfilename for s in head.siblings or []}
    if record not in files:
        if "config.json" in files or any(f.endswith((".safetensors", ".bin")) for f in files):
            raise RepoCollisionError(
                f"{repo_id!r} already holds a model that hf_dpdedup did not push (no {record}); pushing would "
                "overwrite it. Pick another family_name= (--family-name) or namespace, or pass force=True "
                "(--force) to take the repo over."
            )
        return
    path = retry_call(lambda: api.hf_hub_download(repo_id, record, revision=head.sha), what=f"reading {repo_id}")
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    theirs = (data.get("block_store") or {}).get("store_id") if record == CONSTITUTION_FILE else data.get("store_id")
    if theirs != store_id:
        raise RepoCollisionError(
            f"{repo_id!r} belongs to block store {theirs!r}, not to this family's store {store_id!r}: another "
            "family was pushed there, and pushing would repoint it (loaders of that repo would get this "
            "family's model). Pick another family_name= (--family-name) or namespace, or pass force=True "
            "(--force) to repoint it; its old commits keep loading what they pinned."
        )


def member_files(
    family: FamilyStore,
    name: str,
    *,
    repo_id: str,
    store_repo: str,
    store_commit: str,
    endpoint: str,
    base_model: str | None = None,
    license: str | None = None,
    family_stats: dict[str, Any] | None = None,
) -> dict[str, Source]:
    """What member ``name``'s repo holds: its folder, with the constitution pinned to the store commit
    and a model card."""
    folder = family.member_path(name)
    constitution = family.constitution(name)
    pinned = StoreRef(constitution.block_store.store_id, path=None, repo_id=store_repo, revision=store_commit)
    constitution = replace(constitution, block_store=pinned)
    files: dict[str, Source] = {
        f.name: f for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith(".")
    }
    files[CONSTITUTION_FILE] = (json_text(constitution.to_dict()) + "\n").encode()
    # An adapter member's repo has no adapter_config.json: with one, transformers (and peft) would take the
    # repo for a plain peft adapter, load the base and fail on the missing adapter_model.safetensors,
    # instead of reaching the remote code; the adapter config is in the constitution's adapter record.
    files.pop(ADAPTER_CONFIG_FILE, None)
    if "config.json" in files:  # plain transformers loads the member through the remote code
        files["config.json"] = config_with_auto_map(folder / "config.json")
        files[REMOTE_CODE_FILE] = remote_code()
    card = member_card(
        constitution, repo_id=repo_id, store_repo=store_repo, store_commit=store_commit, endpoint=endpoint,
        base_model=base_model or adapter_base_model(constitution) or hub_base_model(folder / "config.json"),
        family=family_stats, license=license,
    )
    files["README.md"] = str(card).encode()
    return files


def adapter_base_model(constitution: Constitution) -> str | None:
    """The base of an adapter member (its ``base_model_name_or_path``), when it is a Hub id."""
    base = constitution.adapter.base_model if constitution.adapter is not None else None
    if not isinstance(base, str) or not is_repo_id(base) or Path(base).exists():
        return None
    return base


def hub_base_model(config_file: Path) -> str | None:
    """The Hub id the member's config was loaded from (``_name_or_path``), when it is a Hub id and
    not a local folder: the card's ``base_model``."""
    try:
        name = json.loads(config_file.read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError):
        return None
    if not isinstance(name, str) or not is_repo_id(name) or Path(name).exists():
        return None
    return name


def ensure_repo(api: HfApi, repo_id: str, *, private: bool) -> None:
    """Create ``repo_id`` unless it exists. (Looked up first: ``create_repo(exist_ok=True)`` answers
    an existing repo with a URL that huggingface_hub rejects for hosts other than huggingface.co.)"""
    try:
        api.repo_info(repo_id)
    except RepositoryNotFoundError:
        api.create_repo(repo_id, private=private, exist_ok=True)


def sync_repo(
    api: HfApi,
    repo_id: str,
    files: dict[str, Source],
    message: str,
    *,
    known_sha256: dict[str, str] | None = None,
) -> RepoPush:
    """Make ``repo_id``'s main branch hold ``files`` in one commit, or none if it already does."""
    head = api.repo_info(repo_id).sha
    remote = {f.path: f for f in api.list_repo_tree(repo_id, revision=head, recursive=True) if isinstance(f, RepoFile)}
    changed = [p for p, src in files.items() if not _same_file(remote.get(p), src, (known_sha256 or {}).get(p))]
    if not changed:
        return RepoPush(repo_id, head, changed=False)
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=_source(files[p])) for p in changed]
    info = api.create_commit(repo_id, operations, commit_message=message, parent_commit=head)
    return RepoPush(repo_id, info.oid, changed=True, files=tuple(changed))


def _same_file(remote: RepoFile | None, source: Source, sha256: str | None) -> bool:
    if remote is None or remote.size != _size(source):
        return False
    if remote.lfs is not None:  # LFS / Xet files are compared by the sha256 of their content
        return remote.lfs.sha256 == (sha256 or _sha256(source))
    return remote.blob_id == git_hash(_read(source))


def _size(source: Source) -> int:
    return len(source) if isinstance(source, bytes) else source.stat().st_size


def _read(source: Source) -> bytes:
    return source if isinstance(source, bytes) else source.read_bytes()


def _sha256(source: Source) -> str:
    return hashlib.sha256(_read(source)).hexdigest()


def _source(source: Source) -> bytes | str:
    return source if isinstance(source, bytes) else str(source)


def _family_stats(family: FamilyStore) -> dict[str, Any]:
    """Stored bytes of the whole family (shards, index, member folders) against its members'
    original weight bytes (every tensor of every member, as separate copies would hold them)."""
    names = family.members()
    original = 0
    for name in names:
        c = family.constitution(name)
        itemsize = family.blocks.dtype.itemsize
        original += sum(t.numel for t in c.tensors) * itemsize
        extras = family.member_path(name) / EXTRAS_FILE
        original += extras.stat().st_size if extras.is_file() else 0
    stored = family.stored_bytes()
    return {"members": len(names), "stored_bytes": stored, "original_bytes": original,
            "stored_fraction": round(stored / original, 4) if original else None}


@contextlib.contextmanager
def push_errors(repo_id: str, *, pushed: list[str]) -> Iterator[None]:
    """Typed errors for a push that failed at ``repo_id`` (``pushed``: repos already up to date)."""
    done = f" Already up to date: {', '.join(pushed)}." if pushed else ""
    try:
        yield
    except HfHubHTTPError as exc:
        status = status_of(exc)
        if status in (401, 403) or isinstance(exc, RepositoryNotFoundError):
            raise HubAuthError(
                f"The Hub refused to write to {repo_id!r} (HTTP {status}): the token needs *write* access to "
                f"the namespace {repo_id.split('/')[0]!r}. Create a write token (Hub settings → Access "
                f"Tokens), then pass token=... / --token or run `hf auth login`.{done}"
            ) from exc
        if status == 400 and "metadata" in str(exc).lower():  # the commit itself refused the card
            raise PushError(_card_rejection(repo_id, getattr(exc, "server_message", None) or str(exc), done)) from None
        if status == 412:
            raise PushError(
                f"Someone else committed to {repo_id!r} during this push, so nothing was written there. "
                f"Run the push again.{done}"
            ) from exc
        raise PushError(_midway(repo_id, f"HTTP {status}: {exc}", done)) from exc
    except ValueError as exc:  # huggingface_hub validates README.md's metadata before committing
        if not str(exc).startswith("Invalid metadata in README.md"):
            raise
        raise PushError(_card_rejection(repo_id, str(exc), done)) from None
    except (*TRANSPORT_ERRORS, OSError) as exc:
        if isinstance(exc, (HubAuthError, PushError)):
            raise
        raise PushError(_midway(repo_id, f"{type(exc).__name__}: {exc}", done)) from exc


def _card_rejection(repo_id: str, server: str, done: str) -> str:
    """The Hub's YAML validation refused the model card: say which metadata field, and how to fix it."""
    field = re.search(r'"([^"]+)"', server)
    what = f"field {field.group(1)!r}" if field else "a field"
    return (
        f"The Hub refused the model card (README.md) of {repo_id!r}: its YAML metadata has an invalid {what} "
        f"({server.strip().splitlines()[-1].lstrip('- ')}). Nothing was written to {repo_id!r}. Fix the value "
        f"that fills it (e.g. base_model= / --base-model must be a Hub model id, license= a license id) and "
        f"push again.{done}"
    )


def _midway(repo_id: str, cause: str, done: str) -> str:
    return (
        f"Pushing {repo_id!r} failed midway ({cause}). Nothing half-written is visible: each repo is updated "
        f"by one atomic commit, so every repo still holds its previous, loadable commit.{done} Run the same "
        "push again to resume: repos already up to date are skipped."
    )
