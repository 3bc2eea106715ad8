"""A minimal HTTP endpoint for a :class:`~.pool.ServingPool` (stdlib ``http.server``, 127.0.0.1).

Routes (JSON in, JSON out):

- ``GET /members`` → ``{"members": ["eps1", ...]}``
- ``POST /members/<id>/infer`` with ``{"text": "a great film"}`` (or a list of texts; needs the
  member's tokenizer) or ``{"inputs": {"input_ids": [[101, ...]], "attention_mask": [[1, ...]]}}``
  → ``{"member": "<id>", "outputs": {"logits": [[...]]}}`` (every tensor the model returns).
- errors: ``{"error": "<TypeName>", "message": "..."}`` with 404 (unknown member or route), 400 (bad
  request body), 503 (no memory freed in time).

Example::

    server = make_server(pool, port=8000)      # binds 127.0.0.1 only
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # curl -s localhost:8000/members/eps4/infer -d '{"text": "a great film"}'
    server.shutdown()

It is a demonstration endpoint: no authentication, no TLS, one thread per connection.
"""

from __future__ import annotations

import json
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from ..errors import ServingError, ServingRequestError, ServingTimeoutError, UnknownMemberError
from .plan import load_tokenizer
from .pool import ServingPool

MAX_BODY_BYTES = 1 << 20
_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_INFER = re.compile(r"^/members/([^/]+)/infer$")


def make_server(pool: ServingPool, *, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """An HTTP server answering inference requests by member id (``port=0``: any free port)."""
    tokenizers = _Tokenizers(pool)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.rstrip("/") == "/members":
                return self._send(HTTPStatus.OK, {"members": pool.members})
            self._error(HTTPStatus.NOT_FOUND, "NotFound", f"No route {self.path}; try GET /members.")

        def do_POST(self) -> None:  # noqa: N802
            match = _INFER.match(self.path)
            if match is None:
                return self._error(HTTPStatus.NOT_FOUND, "NotFound", "POST /members/<id>/infer is the only POST route.")
            member = match.group(1)
            try:
                body = self._body()
                pool.plan(member)  # unknown member: 404 before any tokenizing
                inputs = _inputs(body, member, tokenizers)
                output = pool.infer(member, **inputs)
                self._send(HTTPStatus.OK, {"member": member, "outputs": _jsonable(output)})
            except UnknownMemberError as exc:
                self._error(HTTPStatus.NOT_FOUND, type(exc).__name__, str(exc))
            except ServingTimeoutError as exc:
                self._error(HTTPStatus.SERVICE_UNAVAILABLE, type(exc).__name__, str(exc))
            except (ServingError, ValueError, TypeError, IndexError, RuntimeError) as exc:  # bad inputs
                self._error(HTTPStatus.BAD_REQUEST, type(exc).__name__, str(exc))

        def _body(self) -> dict[str, Any]:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY_BYTES:
                raise ServingRequestError(f"Send a JSON body of 1..{MAX_BODY_BYTES} bytes (Content-Length).")
            try:
                body = json.loads(self.rfile.read(length))
            except json.JSONDecodeError as exc:
                raise ServingRequestError(f"The body is not JSON ({exc}).") from None
            if not isinstance(body, dict):
                raise ServingRequestError('The body must be a JSON object with "text" or "inputs".')
            return body

        def _send(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: HTTPStatus, kind: str, message: str) -> None:
            self._send(status, {"error": kind, "message": message})

        def log_message(self, format: str, *args: Any) -> None:  # quiet: no line per request
            pass

    return ThreadingHTTPServer((host, port), Handler)


class _Tokenizers:
    """Each member's tokenizer, loaded on first use from its folder."""

    def __init__(self, pool: ServingPool) -> None:
        self._pool, self._lock, self._loaded = pool, threading.Lock(), {}

    def __call__(self, member: str) -> Any:
        with self._lock:
            if member not in self._loaded:
                self._loaded[member] = load_tokenizer(self._pool.plan(member).path)
            return self._loaded[member]


def _inputs(body: dict[str, Any], member: str, tokenizers: _Tokenizers) -> dict[str, torch.Tensor]:
    if "text" in body:
        text = body["text"]
        if not (isinstance(text, str) or (isinstance(text, list) and text and all(isinstance(t, str) for t in text))):
            raise ServingRequestError('"text" must be a string or a non-empty list of strings.')
        tokenizer = tokenizers(member)
        if tokenizer is None:
            raise ServingRequestError(f"Member {member!r} has no tokenizer: send token ids as \"inputs\".")
        return dict(tokenizer(text, padding=True, truncation=True, return_tensors="pt"))
    inputs = body.get("inputs")
    if not isinstance(inputs, dict) or "input_ids" not in inputs or not set(inputs) <= set(_INPUT_NAMES):
        raise ServingRequestError(
            f'Send "text", or "inputs": an object with input_ids and optionally {_INPUT_NAMES[1:]}.'
        )
    try:
        return {k: torch.tensor(v, dtype=torch.long) for k, v in inputs.items()}
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ServingRequestError(f'"inputs" must be rectangular lists of integers ({exc}).') from None


def _jsonable(output: Any) -> dict[str, Any]:
    items = output.items() if hasattr(output, "items") else {"output": output}.items()
    return {k: v.tolist() for k, v in items if isinstance(v, torch.Tensor)}
