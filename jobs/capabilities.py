"""Run-scoped cancel capabilities: a browser may stop its own run without the operator's key.

A page that started a run (an LLM's answer, a report) needs a Stop button,
and `POST /api/runs/<id>/cancel` wants `JOBS_EVENT_KEY`, which never goes to
a browser. So the app hands the page, with its subscription grant, a token
that allows one thing: cancelling that one run, for `ttl_s` seconds. Signed
with the SECRET_KEY like subscription tokens (realtime/tokens.py), with a
salt of its own, so neither kind of token passes for the other.
"""
from __future__ import annotations

import hmac
import time
from typing import Any, Callable

from itsdangerous import BadData, URLSafeSerializer


class CancelTokens:
    salt = "jobs.cancel"

    def __init__(self, secret_key: str, *, ttl_s: float = 300, now: Callable[[], float] = time.time) -> None:
        self._serializer = URLSafeSerializer(secret_key, salt=self.salt)
        self.ttl_s = ttl_s
        self._now = now

    def issue(self, run_id: str) -> str:
        return self._serializer.dumps({"r": run_id, "e": self._now() + self.ttl_s})

    def allows(self, token: str, run_id: str) -> bool:
        """Whether `token` is this server's, unexpired, and for `run_id`."""
        try:
            payload: Any = self._serializer.loads(token)
        except BadData:
            return False
        if not isinstance(payload, dict) or payload.keys() != {"r", "e"}:
            return False
        expires_at, granted = payload["e"], payload["r"]
        if isinstance(expires_at, bool) or not isinstance(expires_at, (int, float)) or not isinstance(granted, str):
            return False
        return self._now() < expires_at and hmac.compare_digest(granted.encode(), run_id.encode())
