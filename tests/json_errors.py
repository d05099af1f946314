"""What the bad-input tests share: the endpoints, the size limits and the CONTRACT §3 error check.

`assert_json_error` checks a Flask test response as well as an httpx one, so the
in-process tests and the one against gunicorn hold the server to the same shape.
"""
from __future__ import annotations

import re

from conftest import PUBLISH_KEY

PUBLISH = "/api/realtime/publish"
TOKEN = "/api/realtime/token"
MESSAGES = "/api/realtime/messages"
SUBSCRIBE = "/api/realtime/subscribe"
AUTH = {"Authorization": f"Bearer {PUBLISH_KEY}"}
MAX_DATA = 524288  # REALTIME_MAX_MESSAGE_BYTES default
MAX_BODY = 4 * 1024 * 1024  # the publish endpoint's body limit: a batch, REALTIME_MAX_BATCH_BYTES (realtime/views.py)


def assert_json_error(response, status: int, code: str | None = None) -> dict:
    """CONTRACT §3: `{"error": {"code": "snake_case", "message": "..."}}` with this 4xx status."""
    body = response.get_json(silent=True) if hasattr(response, "get_json") else _json_or_none(response)
    assert response.status_code == status, (response.status_code, body or response_text(response))
    assert response.headers["Content-Type"].startswith("application/json")
    assert isinstance(body, dict) and list(body) == ["error"], body
    error = body["error"]
    assert sorted(error) == ["code", "message"], error
    assert re.fullmatch(r"[a-z][a-z0-9_]*", error["code"]), error
    assert isinstance(error["message"], str) and error["message"].strip(), error
    assert "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def _json_or_none(response):
    try:
        return response.json()
    except ValueError:
        return None


def response_text(response) -> str:
    return response.get_data(as_text=True)[:300] if hasattr(response, "get_data") else response.text[:300]
