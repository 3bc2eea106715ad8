"""A small Hub-compatible HTTP server on 127.0.0.1, for the offline demo and the tests.

It implements the endpoints ``huggingface_hub`` calls to push and pull model repos, with the same
semantics as the Hub where they matter to this package:

- repos hold git-like **immutable commits** (a sha per commit, each a full file tree) and branches
  that point at commits; a commit applies all of its files or none;
- ``POST /api/repos/create``, ``GET /api/whoami-v2``, ``POST /api/validate-yaml``;
- ``GET /api/models/{repo}[/revision/{rev}]`` (repo info with ``sha`` and ``siblings``),
  ``GET /api/models/{repo}/tree/{rev}[/{path}]``, ``GET /api/models/{repo}/refs``;
- ``POST /api/models/{repo}/preupload/{rev}`` answers ``"regular"`` for every file (so contents come
  inline, base64, in the commit payload; no LFS) with the remote ``oid`` so unchanged files are
  skipped; ``POST /api/models/{repo}/commit/{rev}`` (NDJSON; ``parentCommit`` checked: 412 if stale);
  ``POST /api/models/{repo}/super-squash/{branch}`` (history rewritten: old commits are gone);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``, ``ETag`` (the git blob sha1,
  as the Hub sends for regular files), ``Content-Length`` and byte ``Range`` requests;
- errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) as the
  client expects; tokens (``Authorization: Bearer``) have a ``read`` or ``write`` role and write only
  to their own namespace; private repos are invisible to others (401 ``RepoNotFound``).

Tests inject faults (:meth:`HubServer.inject`): answer HTTP 500, drop the connection before
answering, or cut the response body midway (for a commit: applied, then the answer is lost). The
request log (:attr:`HubServer.log`) shows which files were fetched.

    >>> with HubServer(tokens={"hf_write": ("alice", "write")}) as server:
    ...     api = HfApi(endpoint=server.url, token="hf_write")
"""

from __future__ import annotations

import base64
import contextlib
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

DEFAULT_BRANCH = "main"
_SHA = re.compile(r"^[0-9a-f]{40}$")
_REPO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a regular file: what the Hub reports as a file's ``oid`` / ``ETag``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


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

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision, revision if _SHA.match(revision) else None)
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
        self.blobs: dict[str, bytes] = {}
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

    def create_repo(self, repo_id: str, *, private: bool = False) -> Repo:
        with self.lock:
            repo = self.repos[repo_id] = Repo(repo_id, private)
            gitattributes = self._store_blob(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
            repo.branches[DEFAULT_BRANCH] = self._new_commit(repo, None, "initial commit", {".gitattributes": gitattributes}).oid
            return repo


@contextlib.contextmanager
def local_hub(namespace: str = "demo") -> Iterator[tuple[str, str]]:
    """Start a :class:`HubServer` with one write token for ``namespace``; yield ``(url, token)``.

    huggingface_hub reads ``HF_HUB_OFFLINE`` once, at import, and then refuses every request. This
    server is on 127.0.0.1 and nothing it serves leaves the machine, so offline mode is lifted for the
    duration of the block only (demos and examples run the same with or without it).
    """
    from huggingface_hub import constants

    token = secrets.token_hex(16)
    offline = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        with HubServer(tokens={token: (namespace, "write")}) as server:
            yield server.url, token
    finally:
        constants.HF_HUB_OFFLINE = offline


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

    # --- plumbing ------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        self._cut = False
        url = urlsplit(self.path)
        path, self.query = unquote(url.path), parse_qs(url.query)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with self.hub.lock:
            self.hub.log.append((method, path))
            fault = self._fault(method, path)
        if fault is not None and fault.action == "drop":
            return self._drop()
        if fault is not None and fault.action == "error":
            return self._send_json(fault.status, {"error": "injected server error"})
        self._cut = fault is not None and fault.action == "cut"
        try:
            self._route(method, path, body)
        except _HttpError as exc:
            headers = {"X-Error-Message": exc.message}
            if exc.code:
                headers["X-Error-Code"] = exc.code
            if exc.commit:
                headers["X-Repo-Commit"] = exc.commit
            self._send_json(exc.status, {"error": exc.message, **exc.extra}, headers)

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

    def _readable_repo(self, repo_id: str) -> Repo:
        repo = self.hub.repos.get(repo_id)
        user = self._user()
        if repo is None or (repo.private and (user is None or user[0] != repo_id.split("/")[0])):
            status = 401 if user is None else 404
            raise _HttpError(status, f"Repository Not Found for url: {self.path}.", "RepoNotFound")
        return repo

    def _writable_repo(self, repo_id: str) -> Repo:
        repo = self._readable_repo(repo_id)
        self._check_write(repo_id.split("/")[0])
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
        routes = [
            ("POST", r"^/api/repos/create$", self._create_repo),
            ("POST", r"^/api/validate-yaml$", lambda body: self._send_json(200, {})),
            ("GET", r"^/api/whoami-v2$", self._whoami),
            ("GET", r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$", self._repo_info),
            ("GET", r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)(?:/(?P<sub>.*))?$", self._tree),
            ("GET", r"^/api/models/(?P<repo>[^/]+/[^/]+)/refs$", self._refs),
            ("POST", r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$", self._preupload),
            ("POST", r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$", self._commit),
            ("POST", r"^/api/models/(?P<repo>[^/]+/[^/]+)/super-squash/(?P<rev>[^/]+)$", self._squash),
            ("HEAD", r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", self._resolve),
            ("GET", r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", self._resolve),
        ]
        for verb, pattern, handler in routes:
            match = re.match(pattern, path)
            if match and verb == method:
                with self.hub.lock:
                    return handler(body, **match.groupdict())
        raise _HttpError(404, f"No such endpoint: {method} {path} (this local Hub implements a subset).")

    def _commit_of(self, repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    def _create_repo(self, body: bytes) -> None:
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") != "model":
            raise _HttpError(400, "This local Hub hosts model repos only.")
        user = self._user()
        namespace = payload.get("organization") or (user[0] if user else None)
        name = payload.get("name") or ""
        if namespace is None:
            raise _HttpError(401, "You must be authenticated (pass a token) to create a repo.")
        if not (_REPO_NAME.match(name) and _REPO_NAME.match(namespace)):
            raise _HttpError(400, f"Invalid repo name {namespace}/{name}.")
        self._check_write(namespace)
        repo_id = f"{namespace}/{name}"
        if repo_id in self.hub.repos:
            raise _HttpError(409, "You already created this model repo", url=f"{self.hub.url}/{repo_id}")
        private = payload.get("private") or payload.get("visibility") == "private"
        self.hub.create_repo(repo_id, private=bool(private))
        self._send_json(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def _whoami(self, body: bytes) -> None:
        user = self._user()
        if user is None:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        self._send_json(200, {"type": "user", "name": user[0], "orgs": [],
                              "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": user[1]}}})

    def _repo_info(self, body: bytes, repo: str, rev: str | None) -> None:
        r = self._readable_repo(repo)
        commit = self._commit_of(r, rev or DEFAULT_BRANCH)
        self._send_json(200, {
            "id": repo, "modelId": repo, "author": repo.split("/")[0], "sha": commit.oid,
            "private": r.private, "disabled": False, "gated": False, "tags": [],
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        })

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
            entries.append({"type": "file", "oid": oid, "size": len(self.hub.blobs[oid]), "path": path})
        if prefix and not entries and not folders:
            raise _HttpError(404, f"{sub} does not exist at {rev}", "EntryNotFound", commit.oid)
        dirs = [{"type": "directory", "oid": hashlib.sha1(p.encode()).hexdigest(), "size": 0, "path": p}
                for p in sorted(folders)]
        self._send_json(200, dirs + entries)

    def _refs(self, body: bytes, repo: str) -> None:
        r = self._readable_repo(repo)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha} for b, sha in sorted(r.branches.items())]
        self._send_json(200, {"branches": branches, "converts": [], "tags": []})

    def _preupload(self, body: bytes, repo: str, rev: str) -> None:
        r = self._writable_repo(repo)
        commit = self._commit_of(r, rev)
        files = json.loads(body).get("files") or []
        self._send_json(200, {"commitOid": commit.oid, "files": [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": commit.files.get(f["path"])}
            for f in files
        ]})

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
            elif key in ("lfsFile", "copyFile"):
                raise _HttpError(400, f"{key} is not supported by this local Hub (it asks for regular uploads).")
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
        commit = self._commit_of(self._readable_repo(repo), rev)
        oid = commit.files.get(file)
        if oid is None:
            raise _HttpError(404, f"Entry not found: {file} at {rev}", "EntryNotFound", commit.oid)
        data = self.hub.blobs[oid]
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{oid}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        status, start = 200, 0
        rng = re.match(r"^bytes=(\d+)-$", self.headers.get("Range") or "")
        if rng and self.command == "GET":
            start = min(int(rng.group(1)), len(data))
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        payload = data[start:]
        headers["Content-Length"] = str(len(payload))
        self._send(status, payload, headers, body=self.command == "GET")
