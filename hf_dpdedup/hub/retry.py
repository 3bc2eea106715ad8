"""Retry Hub calls that failed with a transient status (429 Too Many Requests, 5xx).

huggingface_hub retries its preupload and download requests itself, but not ``create_commit`` or
``create_repo``, and one HTTP 500 on a file download raises at once. :func:`retry_call` repeats an
*idempotent* step (the caller's job: a push step re-reads the remote state before committing, so a
commit that was applied but whose answer was lost is not made twice) with exponential backoff,
waiting at least what the server's ``Retry-After`` header asks for.
"""

from __future__ import annotations

import email.utils
import logging
import time
from datetime import datetime, timezone
from typing import Callable, TypeVar

from huggingface_hub.errors import HfHubHTTPError

logger = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
MAX_ATTEMPTS = 5
BASE_DELAY = 1.0  # seconds; doubled after each failure
MAX_DELAY = 30.0  # a Retry-After above this is honoured, a computed backoff is capped


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of a Hub error (``None`` for a network error with no answer)."""
    response = getattr(exc, "response", None)
    return response.status_code if response is not None else None


def retry_after(exc: BaseException) -> float | None:
    """The delay a ``Retry-After`` header asks for (seconds or an HTTP date), if any."""
    response = getattr(exc, "response", None)
    value = response.headers.get("Retry-After") if response is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def retry_call(
    fn: Callable[[], T],
    *,
    what: str,
    attempts: int | None = None,
    base_delay: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()``, repeated up to ``attempts`` (default :data:`MAX_ATTEMPTS`) times while it raises an
    HTTP 429 / 5xx error, waiting ``base_delay`` (default :data:`BASE_DELAY`) seconds, doubled after
    each failure, or what ``Retry-After`` asks for."""
    attempts = MAX_ATTEMPTS if attempts is None else attempts
    base_delay = BASE_DELAY if base_delay is None else base_delay
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except HfHubHTTPError as exc:
            status = status_of(exc)
            if status not in RETRY_STATUSES or attempt == attempts:
                raise
            asked = retry_after(exc)
            delay = asked if asked is not None else min(MAX_DELAY, base_delay * 2 ** (attempt - 1))
            logger.warning("%s: HTTP %s (attempt %d of %d); retrying in %.1f s", what, status, attempt,
                           attempts, delay)
            sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover
