"""Reading what a client sent, the same strict way for every endpoint.

Bodies are JSON in strict UTF-8 (whatever the Content-Type says), with no
NaN or Infinity, which JSON does not have and browsers cannot parse. Size
limits come from Flask's MAX_CONTENT_LENGTH.
"""
from __future__ import annotations

import hmac
import json
from typing import Any

from flask import request
from werkzeug.exceptions import RequestEntityTooLarge

from common.errors import AppError


def json_body() -> Any:
    """The request body as a JSON value; 400 `invalid_json` or 413 otherwise."""
    raw = request.get_data(cache=False)
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(raw) >= limit:
        # A chunked body is cut at the limit rather than refused (Werkzeug's
        # LimitedStream): refuse it here, or it would fail as broken JSON.
        raise RequestEntityTooLarge()
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AppError("the body must be JSON encoded as UTF-8", code="invalid_json") from None


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
