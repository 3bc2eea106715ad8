"""A small Hub-compatible HTTP server on 127.0.0.1, for the offline demo and the tests.

It implements the endpoints ``huggingface_hub`` calls to push and pull model repos, and data set
repos (``repo_type="dataset"``: ``Dataset.push_to_hub`` and ``datasets.load_dataset("ns/name")``
work against it), with the same semantics as the Hub where they matter to this package:

- repos hold git-like **immutable commits** (a sha per commit, each a full file tree) and branches
  that point at commits; a commit applies all of its files or none;
- data set repos take the same routes as model repos with ``/api/datasets/...`` for ``/api/models/...``
  and a ``/datasets/`` prefix before ``{repo}/resolve/...`` and ``{repo}.git/...``; in
  :attr:`HubServer.repos` they are keyed ``datasets/<repo_id>`` (:func:`repo_key`);
- ``POST /api/repos/create`` (``type`` ``model`` or ``dataset``), ``GET /api/whoami-v2``, ``POST /api/validate-yaml``;
- ``GET /api/models/{repo}[/revision/{rev}]`` (repo info with ``sha`` and ``siblings``),
  ``GET /api/models/{repo}/tree/{rev}[/{path}]``, ``GET /api/models/{repo}/refs``;
- ``POST /api/models/{repo}/preupload/{rev}`` answers ``"lfs"`` for files the repo's
  ``.gitattributes`` sends to LFS (``*.safetensors``), files of 10 MB or more and binary files, and
  ``"regular"`` for the others (contents inline, base64, in the commit payload) with the remote
  ``oid`` so unchanged files are skipped;
- the **git-LFS batch API**, "basic" transfer: ``POST /{repo}.git/info/lfs/objects/batch`` (an
  ``upload`` + ``verify`` action per object not stored yet, none for one already stored),
  ``PUT`` of the bytes to the upload href (sha256 checked), ``POST .../objects/verify``; a commit's
  ``lfsFile`` entries then reference the uploaded objects. (huggingface_hub takes this path when Xet
  is unavailable, e.g. ``HF_HUB_DISABLE_XET=1``.) LFS files are listed in trees with an ``lfs``
  entry (sha256, size, pointer size), and ``resolve`` sends ``X-Linked-Etag`` (the sha256) and
  ``X-Linked-Size`` for them, as the Hub does;
- ``POST /api/models/{repo}/commit/{rev}`` (NDJSON; ``parentCommit`` checked: 412 if stale; a
  ``README.md`` whose YAML metadata the Hub would reject: 400 naming the field);
  ``POST /api/models/{repo}/super-squash/{branch}`` (history rewritten: old commits are gone);
- tags: ``POST /api/models/{repo}/tag/{rev}``, ``DELETE /api/models/{repo}/tag/{tag}``, listed in
  ``refs``; every ``revision=`` accepts a branch, a tag or a commit sha;
- gated repos: ``PUT /api/models/{repo}/settings`` (``{"gated": "auto" | "manual" | false}``);
  the files of a gated repo are served only to its owner and to users granted access
  (:meth:`HubServer.grant`), others get 403 ``GatedRepo`` (401 without a token);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (the git blob sha1,
  as the Hub sends for regular files), ``Content-Length`` and byte ``Range`` requests;
- repo info carries ``pipeline_tag``, ``library_name``, ``tags`` and ``cardData`` read from the
  ``README.md`` metadata, as the Hub derives them;
- errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``,
  ``GatedRepo``) as the client expects; tokens (``Authorization: Bearer``) have a ``read`` or
  ``write`` role and write only to their own namespace; private repos are invisible to others (401
  ``RepoNotFound``).

Tests inject faults (:meth:`HubServer.inject`): answer HTTP 500 (or 429, with ``headers=`` such as
``Retry-After``), drop the connection before answering, or cut the response body midway (for a
commit: applied, then the answer is lost). The
request log (:attr:`HubServer.log`) shows which files were fetched.

    >>> with HubServer(tokens={"hf_write": ("alice", "write")}) as server:
    ...     api = HfApi(endpoint=server.url, token="hf_write")
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import itertools
import json
import re
import secrets
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import yaml
from huggingface_hub import constants

DEFAULT_BRANCH = "main"
LFS_THRESHOLD = 10 * 1000 * 1000  # the Hub sends files of 10 MB or more through LFS
_SHA = re.compile(r"^[0-9a-f]{40}$")
_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def repo_key(repo_id: str, repo_type: str = "model") -> str:
    """The key of a repo in :attr:`HubServer.repos`: ``repo_id`` for a model, ``datasets/<repo_id>`` for a
    data set (the prefix its URLs carry), so a model and a data set may share an id, as on the Hub."""
    if repo_type not in ("model", "dataset"):
        raise ValueError(f"This local Hub hosts model and dataset repos, not {repo_type!r} ones.")
    return repo_id if repo_type == "model" else f"datasets/{repo_id}"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a regular file: what the Hub reports as a file's ``oid`` / ``ETag``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-LFS pointer file that git stores in place of an LFS file's content."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, str]  # path -> blob oid


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)  # tag -> commit sha
    gated: str | bool = False  # False, "auto" or "manual"
    granted: set[str] = field(default_factory=set)  # users allowed to read a gated repo's files
    repo_type: str = "model"  # or "dataset"

    @property
    def namespace(self) -> str:
        return self.repo_id.split("/")[0]

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision) or self.tags.get(revision) or (revision if _SHA.match(revision) else None)
        return self.commits.get(sha) if sha else None


@dataclass
class Fault:
    """Misbehave on matching requests: ``action`` is ``"error"`` (HTTP ``status``), ``"drop"`` (close
    the connection without answering) or ``"cut"`` (handle the request, then send half the answer's
    body and close). The first ``skip`` matches pass; the next ``times`` fire."""

    # Faults are checked in the order they were injected; the first that fires answers the request.
    method: str  # "GET", "HEAD", "POST" or "*"
    path: str  # regular expression searched in the URL path (unquoted)
    action: str = "error"
    skip: int = 0
    times: int = 1
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    fired: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.method in ("*", method) and re.search(self.path, path) is not None


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, commit: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.code, self.commit, self.extra = status, message, code, commit, extra


class HubServer:
    """An in-memory Hub on ``http://127.0.0.1:<port>``. Use as a context manager or call
    :meth:`start` / :meth:`stop`. ``tokens`` maps a token to ``(user name, "read" | "write")``."""

    def __init__(self, *, tokens: dict[str, tuple[str, str]] | None = None, port: int = 0) -> None:
        self.tokens = dict(tokens or {})
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # oid -> content (for an LFS file: its pointer's oid)
        self.lfs_oids: dict[str, str] = {}  # pointer oid -> sha256, for files stored through LFS
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> bytes uploaded through the LFS batch API
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str]] = []  # (method, path) of every request, in order
        self.lock = threading.RLock()
        self._counter = itertools.count()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        # a short poll interval: stop() returns within 50 ms instead of serve_forever's default 0.5 s
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hf-dpdedup-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # --- test hooks --------------------------------------------------------------------------------
    def inject(self, method: str, path: str, action: str = "error", **kwargs: Any) -> Fault:
        fault = Fault(method, path, action, **kwargs)
        with self.lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def fetched(self, repo_id: str | None = None) -> list[str]:
        """Files whose contents were requested (``GET .../resolve/...``), optionally of one repo."""
        out = []
        for method, path in self.log:
            m = re.match(r"^/([^/]+/[^/]+)/resolve/[^/]+/(.+)$", path)
            if method == "GET" and m and (repo_id is None or m.group(1) == repo_id):
                out.append(m.group(2))
        return out

    def tamper(self, repo_id: str, path: str, data: bytes) -> None:
        """Replace a file's bytes in every commit, as storage corruption would (the oid stays)."""
        with self.lock:
            repo = self.repos[repo_id]
            for commit in repo.commits.values():
                if path in commit.files:
                    self.blobs[commit.files[path]] = data

    def grant(self, repo_id: str, user: str) -> None:
        """Give ``user`` access to gated repo ``repo_id`` (as accepting its access request does)."""
        with self.lock:
            self.repos[repo_id].granted.add(user)

    def lfs_files(self, repo_id: str, revision: str = DEFAULT_BRANCH) -> dict[str, str]:
        """The files of ``repo_id`` at ``revision`` stored through LFS, with their sha256."""
        with self.lock:
            commit = self.repos[repo_id].resolve(revision)
            return {p: self.lfs_oids[o] for p, o in commit.files.items() if o in self.lfs_oids}

    def head(self, repo_id: str, branch: str = DEFAULT_BRANCH) -> str:
        with self.lock:
            return self.repos[repo_id].branches[branch]

    def commit_count(self, repo_id: str) -> int:
        with self.lock:
            return len(self.repos[repo_id].commits)

    # --- state changes -----------------------------------------------------------------------------
    def _new_commit(self, repo: Repo, parent: str | None, message: str, files: dict[str, str]) -> Commit:
        seed = json.dumps([repo.repo_id, parent, message, sorted(files.items()), next(self._counter)])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent, message, dict(files))
        repo.commits[commit.oid] = commit
        return commit

    def _store_blob(self, data: bytes) -> str:
        oid = git_blob_sha1(data)
        self.blobs.setdefault(oid, data)
        return oid

    def _store_lfs(self, sha256: str) -> str:
        data = self.lfs_objects[sha256]
        oid = git_blob_sha1(lfs_pointer(sha256, len(data)))
        self.blobs.setdefault(oid, data)
        self.lfs_oids[oid] = sha256
        return oid

    def create_repo(self, repo_id: str, *, private: bool = False, repo_type: str = "model") -> Repo:
        with self.lock:
            repo = self.repos[repo_key(repo_id, repo_type)] = Repo(repo_id, private, repo_type=repo_type)
            gitattributes = self._store_blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
            repo.branches[DEFAULT_BRANCH] = self._new_commit(repo, None, "initial commit", {".gitattributes": gitattributes}).oid
            return repo


@contextlib.contextmanager
def local_hub(namespace: str = "demo") -> Iterator[tuple[str, str]]:
    """Start a :class:`HubServer` with one write token for ``namespace``; yield ``(url, token)``.

    huggingface_hub reads ``HF_HUB_OFFLINE`` and ``HF_HUB_DISABLE_XET`` once, at import. This server
    is on 127.0.0.1 and nothing it serves leaves the machine, so offline mode is lifted for the
    duration of the block only (demos and examples run the same with or without it); uploads take the
    git-LFS path this server implements (it has no Xet storage), as with ``HF_HUB_DISABLE_XET=1``.
    """
    token = secrets.token_hex(16)
    offline, no_xet = constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET
    constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = False, True
    try:
        with HubServer(tokens={token: (namespace, "write")}) as server:
            yield server.url, token
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_DISABLE_XET = offline, no_xet


def _make_handler(server: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        hub = server

    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: no 40 ms delayed-ACK stall
    hub: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read HubServer.log
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    # --- plumbing ------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        self._cut = False
        url = urlsplit(self.path)
        path, self.query = unquote(url.path), parse_qs(url.query)
        body = self._read_body()
        with self.hub.lock:
            self.hub.log.append((method, path))
            fault = self._fault(method, path)
        if fault is not None and fault.action == "drop":
            return self._drop()
        if fault is not None and fault.action == "error":
            return self._send_json(fault.status, {"error": "injected server error"}, dict(fault.headers))
        self._cut = fault is not None and fault.action == "cut"
        try:
            self._route(method, path, body)
        except _HttpError as exc:
            headers = {"X-Error-Message": " ".join(exc.message.split("\n"))}  # a header is one line
            if exc.code:
                headers["X-Error-Code"] = exc.code
            if exc.commit:
                headers["X-Repo-Commit"] = exc.commit
            self._send_json(exc.status, {"error": exc.message, **exc.extra}, headers)

    def _read_body(self) -> bytes:
        if (self.headers.get("Transfer-Encoding") or "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        chunks = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def _fault(self, method: str, path: str) -> Fault | None:
        for fault in self.hub.faults:
            if fault.matches(method, path):
                if fault.skip > 0:
                    fault.skip -= 1
                elif fault.fired < fault.times:
                    fault.fired += 1
                    return fault
        return None

    def _drop(self) -> None:
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send(self, status: int, data: bytes, headers: dict[str, str], *, body: bool = True) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not body or self.command == "HEAD":  # a HEAD answer never has a body, errors included
            return
        if self._cut:  # half the body, then the connection dies: the client sees a short read
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            return self._drop()
        self.wfile.write(data)

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    # --- auth ----------------------------------------------------------------------------------
    def _user(self) -> tuple[str, str] | None:
        auth = self.headers.get("Authorization") or ""
        token = auth[7:] if auth.startswith("Bearer ") else None
        if token is None:
            return None
        user = self.hub.tokens.get(token)
        if user is None:
            raise _HttpError(401, "Invalid credentials in Authorization header: the token is unknown.")
        return user

    def _readable_repo(self, key: str) -> Repo:
        repo = self.hub.repos.get(key)
        user = self._user()
        if repo is None or (repo.private and (user is None or user[0] != repo.namespace)):
            status = 401 if user is None else 404
            raise _HttpError(status, f"Repository Not Found for url: {self.path}.", "RepoNotFound")
        return repo

    def _check_gate(self, repo: Repo) -> None:
        """A gated repo's files go to its owner and to users granted access only."""
        if not repo.gated:
            return
        user = self._user()
        if user is None:
            raise _HttpError(401, f"Access to model {repo.repo_id} is restricted. You must be authenticated "
                             "to access it.", "GatedRepo")
        if user[0] != repo.namespace and user[0] not in repo.granted:
            raise _HttpError(403, f"Access to model {repo.repo_id} is restricted and you are not in the "
                             "authorized list. Visit the repo page to ask for access.", "GatedRepo")

    def _writable_repo(self, key: str) -> Repo:
        repo = self._readable_repo(key)
        self._check_write(repo.namespace)
        return repo

    def _check_write(self, namespace: str) -> str:
        user = self._user()
        if user is None:
            raise _HttpError(401, "You must be authenticated (pass a token) to write to the Hub.")
        name, role = user
        if role != "write" or name != namespace:
            raise _HttpError(403, f"You don't have the rights to write to {namespace!r}: this token is "
                             f"{role!r} for user {name!r}.")
        return name

    # --- routes --------------------------------------------------------------------------------
    def _route(self, method: str, path: str, body: bytes) -> None:
        api = r"^/api/(?P<kind>models|datasets)/(?P<repo>[^/]+/[^/]+)"  # model and dataset repos alike
        git = r"^/(?P<kind>datasets/)?(?P<repo>[^/]+/[^/]+)"
        routes = [
            ("POST", r"^/api/repos/create$", self._create_repo),
            ("POST", r"^/api/validate-yaml$", self._validate_yaml),
            ("GET", r"^/api/whoami-v2$", self._whoami),
            ("GET", api + r"(?:/revision/(?P<rev>[^/]+))?$", self._repo_info),
            ("GET", api + r"/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?$", self._tree),
            ("GET", api + r"/refs$", self._refs),
            ("POST", api + r"/preupload/(?P<rev>[^/]+)$", self._preupload),
            ("POST", api + r"/commit/(?P<rev>[^/]+)$", self._commit),
            ("POST", api + r"/super-squash/(?P<rev>[^/]+)$", self._squash),
            ("POST", api + r"/tag/(?P<rev>[^/]+)$", self._create_tag),
            ("DELETE", api + r"/tag/(?P<tag>[^/]+)$", self._delete_tag),
            ("PUT", api + r"/settings$", self._settings),
            ("POST", git + r"\.git/info/lfs/objects/batch$", self._lfs_batch),
            ("POST", git + r"\.git/info/lfs/objects/verify$", self._lfs_verify),
            ("PUT", r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$", self._lfs_put),
            ("HEAD", git + r"/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", self._resolve),
            ("GET", git + r"/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", self._resolve),
        ]
        for verb, pattern, handler in routes:
            match = re.match(pattern, path)
            if match and verb == method:
                groups = match.groupdict()
                if groups.pop("kind", None) in ("datasets", "datasets/"):
                    groups["repo"] = repo_key(groups["repo"], "dataset")
                with self.hub.lock:
                    return handler(body, **groups)
        raise _HttpError(404, f"No such endpoint: {method} {path} (this local Hub implements a subset).")

    def _commit_of(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _create_repo(self, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        if repo_type not in ("model", "dataset"):
            raise _HttpError(400, f"This local Hub hosts model and dataset repos, not {repo_type!r} ones.")
        user = self._user()
        namespace = payload.get("organization") or (user[0] if user else None)
        name = payload.get("name") or ""
        if namespace is None:
            raise _HttpError(401, "You must be authenticated (pass a token) to create a repo.")
        if not (_REPO_NAME.match(name) and _REPO_NAME.match(namespace)):
            raise _HttpError(400, f"Invalid repo name {namespace}/{name}.")
        self._check_write(namespace)
        repo_id = f"{namespace}/{name}"
        key = repo_key(repo_id, repo_type)
        if key in self.hub.repos:
            raise _HttpError(409, f"You already created this {repo_type} repo", url=f"{self.hub.url}/{key}")
        private = payload.get("private") or payload.get("visibility") == "private"
        self.hub.create_repo(repo_id, private=bool(private), repo_type=repo_type)
        self._send_json(200, {"url": f"{self.hub.url}/{key}", "name": repo_id})

    def _validate_yaml(self, body: bytes) -> None:
        problem = _card_problem((json.loads(body or b"{}").get("content") or "").encode())
        if problem:  # the Hub's answer: {"errors": [{"message"}], "warnings": [...]}
            raise _HttpError(400, f"Invalid metadata in README.md: {problem}", errors=[{"message": problem}],
                             warnings=[])
        self._send_json(200, {"errors": [], "warnings": []})

    def _whoami(self, body: bytes) -> None:
        user = self._user()
        if user is None:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        self._send_json(200, {"type": "user", "name": user[0], "orgs": [],
                              "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": user[1]}}})

    def _repo_info(self, body: bytes, repo: str, rev: str | None) -> None:
        r = self._readable_repo(repo)
        commit = self._commit_of(r, rev or DEFAULT_BRANCH)
        card = self._card_data(commit)
        tags = card.get("tags") if isinstance(card.get("tags"), list) else []
        info = {
            "id": r.repo_id, "author": r.namespace, "sha": commit.oid,
            "private": r.private, "disabled": False, "gated": r.gated, "tags": tags,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        }
        if r.repo_type == "model":
            info["modelId"] = r.repo_id
        if card:
            info["cardData"] = card
            info.update({k: card[k] for k in ("pipeline_tag", "library_name") if isinstance(card.get(k), str)})
        self._send_json(200, info)

    def _card_data(self, commit: Commit) -> dict:
        """The YAML metadata of a commit's README.md (what the Hub shows as ``cardData``)."""
        oid = commit.files.get("README.md")
        data = _front_matter(self.hub.blobs[oid]) if oid else None
        return data if isinstance(data, dict) else {}

    def _tree(self, body: bytes, repo: str, rev: str, sub: str | None) -> None:
        commit = self._commit_of(self._readable_repo(repo), rev)
        prefix = f"{sub.strip('/')}/" if sub else ""
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries, folders = [], set()
        for path, oid in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):]
            if "/" in rest and not recursive:
                folders.add(prefix + rest.split("/")[0])
                continue
            for i, part in enumerate(rest.split("/")[:-1]):
                folders.add(prefix + "/".join(rest.split("/")[: i + 1]))
            entries.append(self._file_entry(path, oid))
        if prefix and not entries and not folders:
            raise _HttpError(404, f"{sub} does not exist at {rev}", "EntryNotFound", commit.oid)
        dirs = [{"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p}
                for p in sorted(folders)]
        self._send_json(200, dirs + entries)

    def _file_entry(self, path: str, oid: str) -> dict:
        entry = {"type": "file", "oid": oid, "size": len(self.hub.blobs[oid]), "path": path}
        if oid in self.hub.lfs_oids:
            sha256 = self.hub.lfs_oids[oid]
            entry["lfs"] = {"oid": sha256, "size": entry["size"], "pointerSize": len(lfs_pointer(sha256, entry["size"]))}
        return entry

    def _refs(self, body: bytes, repo: str) -> None:
        r = self._readable_repo(repo)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in sorted(r.branches.items())]
        tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": sha} for t, sha in sorted(r.tags.items())]
        self._send_json(200, {"branches": branches, "converts": [], "tags": tags})

    def _create_tag(self, body: bytes, repo: str, rev: str) -> None:
        r = self._writable_repo(repo)
        commit = self._commit_of(r, rev)
        tag = json.loads(body or b"{}").get("tag") or ""
        if not _REPO_NAME.match(tag):
            raise _HttpError(400, f"Invalid tag name {tag!r}.")
        if tag in r.tags or tag in r.branches:
            raise _HttpError(409, f"Tag {tag!r} already exists.")
        r.tags[tag] = commit.oid
        self._send_json(200, {})

    def _delete_tag(self, body: bytes, repo: str, tag: str) -> None:
        r = self._writable_repo(repo)
        if r.tags.pop(tag, None) is None:
            raise _HttpError(404, f"Invalid rev id: {tag}", "RevisionNotFound")
        self._send_json(200, {})

    def _settings(self, body: bytes, repo: str) -> None:
        r = self._writable_repo(repo)
        payload = json.loads(body or b"{}")
        if "gated" in payload:
            if payload["gated"] not in ("auto", "manual", False):
                raise _HttpError(400, f"Invalid gated status {payload['gated']!r}.")
            r.gated = payload["gated"]
        if "visibility" in payload:
            r.private = payload["visibility"] == "private"
        self._send_json(200, {})

    # --- git LFS ("basic" transfer) ----------------------------------------------------------
    def _lfs_batch(self, body: bytes, repo: str) -> None:
        self._writable_repo(repo)
        payload = json.loads(body or b"{}")
        if payload.get("operation") != "upload":
            raise _HttpError(400, "This local Hub accepts LFS uploads only (downloads go through resolve).")
        if "basic" not in (payload.get("transfers") or ["basic"]):
            raise _HttpError(400, "This local Hub speaks the 'basic' LFS transfer only.")
        objects = []
        for obj in payload.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            entry = {"oid": oid, "size": size, "authenticated": True}
            if not (isinstance(oid, str) and re.fullmatch(r"[0-9a-f]{64}", oid) and isinstance(size, int)):
                entry["error"] = {"code": 422, "message": "oid must be a sha256 and size an integer"}
            elif oid not in self.hub.lfs_objects:  # already stored: no actions, the client skips it
                entry["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-upload/{oid}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/{repo}.git/info/lfs/objects/verify", "header": {}},
                }
            objects.append(entry)
        self._send_json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                        {"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_put(self, body: bytes, oid: str) -> None:
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HttpError(400, "The uploaded bytes do not match the object's sha256.")
        self.hub.lfs_objects.setdefault(oid, body)
        self._send(200, b"", {})

    def _lfs_verify(self, body: bytes, repo: str) -> None:
        self._writable_repo(repo)
        payload = json.loads(body or b"{}")
        data = self.hub.lfs_objects.get(payload.get("oid"))
        if data is None or len(data) != payload.get("size"):
            raise _HttpError(404, f"LFS object {payload.get('oid')} was not uploaded (or has another size).")
        self._send_json(200, {"message": "Object verified"})

    def _preupload(self, body: bytes, repo: str, rev: str) -> None:
        r = self._writable_repo(repo)
        commit = self._commit_of(r, rev)
        files = json.loads(body).get("files") or []
        lfs_patterns = _lfs_patterns(self.hub.blobs.get(commit.files.get(".gitattributes", ""), b""))
        answers = []
        for f in files:
            sample = base64.b64decode(f.get("sample") or "")
            lfs = (any(fnmatch.fnmatch(f["path"].rsplit("/", 1)[-1], p) or fnmatch.fnmatch(f["path"], p)
                       for p in lfs_patterns)
                   or int(f.get("size") or 0) >= LFS_THRESHOLD or b"\0" in sample)
            remote = commit.files.get(f["path"])
            answers.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": None if lfs or remote in self.hub.lfs_oids else remote})
        self._send_json(200, {"commitOid": commit.oid, "files": answers})

    def _commit(self, body: bytes, repo: str, rev: str) -> None:
        r = self._writable_repo(repo)
        if rev not in r.branches:
            raise _HttpError(404, f"Invalid rev id: {rev} (commits go to a branch)", "RevisionNotFound")
        head = r.commits[r.branches[rev]]
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x.get("key") == "header"), {})
        parent = header.get("parentCommit")
        if parent is not None and parent != head.oid:
            raise _HttpError(412, f"A commit has happened since {parent}: the branch is at {head.oid}. Pull and retry.")
        files = dict(head.files)
        for item in lines:
            key, value = item.get("key"), item.get("value") or {}
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _HttpError(400, "file contents must be base64")
                files[value["path"]] = self.hub._store_blob(base64.b64decode(value["content"]))
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise _HttpError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                files = {p: o for p, o in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            elif key == "lfsFile":
                sha256 = value.get("oid")
                if sha256 not in self.hub.lfs_objects:
                    raise _HttpError(400, f"LFS object {sha256} of {value.get('path')} was never uploaded "
                                     "(upload it through the LFS batch API first).")
                files[value["path"]] = self.hub._store_lfs(sha256)
            elif key == "copyFile":
                raise _HttpError(400, "copyFile is not supported by this local Hub.")
        if "README.md" in files and files["README.md"] != head.files.get("README.md"):
            problem = _card_problem(self.hub.blobs[files["README.md"]])
            if problem:
                raise _HttpError(400, f"Invalid metadata in README.md.\n- {problem}")
        commit = self.hub._new_commit(r, head.oid, header.get("summary") or "", files)
        r.branches[rev] = commit.oid
        self._send_json(200, {"success": True, "commitOid": commit.oid, "hookOutput": "",
                              "commitUrl": f"{self.hub.url}/{repo}/commit/{commit.oid}"})

    def _squash(self, body: bytes, repo: str, rev: str) -> None:
        r = self._writable_repo(repo)
        head = self._commit_of(r, rev)
        message = json.loads(body or b"{}").get("message") or "squash"
        r.commits.clear()
        r.branches = {rev: self.hub._new_commit(r, None, message, head.files).oid}
        self._send_json(200, {})

    def _resolve(self, body: bytes, repo: str, rev: str, file: str) -> None:
        r = self._readable_repo(repo)
        commit = self._commit_of(r, rev)
        self._check_gate(r)
        oid = commit.files.get(file)
        if oid is None:
            raise _HttpError(404, f"Entry not found: {file} at {rev}", "EntryNotFound", commit.oid)
        data = self.hub.blobs[oid]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{oid}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if oid in self.hub.lfs_oids:  # as the Hub answers for LFS files (before its CDN redirect)
            headers.update({"ETag": f'"{self.hub.lfs_oids[oid]}"', "X-Linked-Etag": f'"{self.hub.lfs_oids[oid]}"',
                            "X-Linked-Size": str(len(data))})
        status, start = 200, 0
        rng = re.match(r"^bytes=(\d+)-$", self.headers.get("Range") or "")
        if rng and self.command == "GET":
            start = min(int(rng.group(1)), len(data))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        payload = data[start:]
        headers["Content-Length"] = str(len(payload))
        self._send(status, payload, headers, body=self.command == "GET")


def _front_matter(readme: bytes) -> Any:
    text = readme.decode("utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    try:
        return yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return None


def _lfs_patterns(gitattributes: bytes) -> list[str]:
    return [line.split()[0] for line in gitattributes.decode(errors="replace").splitlines()
            if "filter=lfs" in line and line.split()]


_STRING_LISTS = ("tags", "datasets", "language", "metrics")


def _card_problem(readme: bytes) -> str | None:
    """What the Hub's metadata validation would reject in a README.md, as its message names it."""
    text = readme.decode("utf-8", errors="replace")
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    try:
        data = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError as exc:
        return f"the YAML metadata does not parse: {exc}"
    if not isinstance(data, dict):
        return None if data is None else "the YAML metadata must be a mapping"
    for key in _STRING_LISTS:
        value = data.get(key)
        if value is not None and not (isinstance(value, str) or
                                      (isinstance(value, list) and all(isinstance(v, str) for v in value))):
            return f'"{key}" must be a string or a list of strings'
    for key in ("base_model",):
        values = data.get(key)
        for value in [values] if isinstance(values, str) else (values or []):
            if not (isinstance(value, str) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", value)):
                return f'"{key}" with value {value!r} is not a valid model id'
    for i, model in enumerate(data.get("model-index") or []):
        for j, result in enumerate((model or {}).get("results") or []):
            where = f"model-index[{i}].results[{j}]"
            for part in ("task", "dataset"):
                if not isinstance((result or {}).get(part), dict) or not result[part].get("type"):
                    return f'"{where}.{part}.type" is required'
            if not result["dataset"].get("name"):
                return f'"{where}.dataset.name" is required'
            for k, metric in enumerate(result.get("metrics") or []):
                if not isinstance(metric, dict) or not isinstance(metric.get("value"), (int, float, str)):
                    return f'"{where}.metrics[{k}].value" is required'
    return None
