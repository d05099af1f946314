"""Reading what a client sent, the same strict way for every endpoint.

Bodies are JSON in strict UTF-8 (whatever the Content-Type says), with no
NaN or Infinity, which JSON does not have and browsers cannot parse. Size
limits come from Flask's MAX_CONTENT_LENGTH; time limits from
`BODY_TIMEOUT_S` (CONTRACT §5 "Bounds").
"""
from __future__ import annotations

import hmac
import json
from typing import Any

from flask import request
from gevent import Timeout
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from common.errors import AppError
from common.greenlets import gevent_is_patched

#: The whole body must arrive within this many seconds: a client trickling a
#: byte now and then would otherwise hold its connection (and greenlet) forever.
BODY_TIMEOUT_S = 10.0


class BodyTimeout(AppError):
    """The body trickled in too slowly (408; CONTRACT §5 "Bounds")."""

    status = 408
    code = "request_timeout"


def json_body() -> Any:
    """The request body as a JSON value; 400 `invalid_json`, 408 or 413 otherwise."""
    raw = _read_body()
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(raw) >= limit:
        # A chunked body is cut at the limit rather than refused (Werkzeug's
        # LimitedStream): refuse it here, or it would fail as broken JSON.
        raise RequestEntityTooLarge()
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AppError("the body must be JSON encoded as UTF-8", code="invalid_json") from None


def _read_body() -> bytes:
    """The raw body, read within `BODY_TIMEOUT_S` under gevent.

    gunicorn's gevent worker has no per-request timeout, so the deadline is a
    `gevent.Timeout` around the read. Only our own instance is caught: an
    outer timeout (the worker's, a caller's) must still reach its owner.
    Without gevent (tests, `flask run`) the body is read as it comes.
    """
    deadline = Timeout(BODY_TIMEOUT_S) if gevent_is_patched() else None
    if deadline is not None:
        deadline.start()
    try:
        return request.get_data(cache=False)
    except Timeout as exc:
        if exc is not deadline:
            raise
        raise BodyTimeout(
            f"the request body did not arrive within {BODY_TIMEOUT_S:g} s; send it in one go"
        ) from None
    except (OSError, ClientDisconnected):
        # The client went away mid-body: gunicorn raises NoMoreData (an
        # OSError), which Werkzeug's LimitedStream turns into ClientDisconnected.
        raise AppError("the request body ended before it was complete", code="malformed_request") from None
    finally:
        if deadline is not None:
            deadline.close()


def json_object() -> dict[str, Any]:
    """The request body, which must be a JSON object."""
    body = json_body()
    if not isinstance(body, dict):
        raise AppError("the body must be a JSON object", code="invalid_json")
    return body


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def bearer_token() -> str | None:
    """The credentials of `Authorization: Bearer ...`, or None."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def bearer_matches(expected: str) -> bool:
    """Whether `Authorization: Bearer ...` carries `expected` (compared in constant time)."""
    given = bearer_token()
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())
