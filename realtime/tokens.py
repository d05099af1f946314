"""Subscription tokens: which channel and topics a client may watch, until when.

The server signs them with its SECRET_KEY (itsdangerous, HMAC-SHA1 over a
salted key) and hands them to the browser, so the key itself never leaves the
server (Inngest's `getSubscriptionToken`, Mercure's subscriber JWT). A token is
checked when a stream opens; a stream already open outlives it, and a client
that reconnects later asks for a new one.

The expiry travels inside the signed payload, and `now` is injected, so tests
move the clock instead of sleeping.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from itsdangerous import BadSignature, URLSafeSerializer

from .errors import InvalidToken, TokenExpired
from .names import check_channel, check_topics


@dataclass(frozen=True)
class Grant:
    """What a valid token allows: this channel, these topics, until `expires_at` (Unix time)."""

    token: str
    channel: str
    topics: tuple[str, ...]
    expires_at: float

    def to_json(self) -> dict[str, Any]:
        """The body of `POST /api/realtime/token` (CONTRACT §3)."""
        return {
            "token": self.token,
            "channel": self.channel,
            "topics": list(self.topics),
            "expires_at": datetime.fromtimestamp(self.expires_at, timezone.utc).isoformat(timespec="seconds"),
        }


class TokenIssuer:
    salt = "realtime.subscribe"

    def __init__(
        self, secret_key: str, *, ttl_s: float = 60, now: Callable[[], float] = time.time
    ) -> None:
        self._serializer = URLSafeSerializer(secret_key, salt=self.salt)
        self.ttl_s = ttl_s
        self._now = now

    def issue(self, channel: str, topics: Sequence[str], ttl_s: float | None = None) -> Grant:
        channel = check_channel(channel)
        topics_ = check_topics(topics)
        expires_at = self._now() + (self.ttl_s if ttl_s is None else ttl_s)
        token = self._serializer.dumps({"c": channel, "t": list(topics_), "e": expires_at})
        return Grant(token, channel, topics_, expires_at)

    def verify(self, token: str) -> Grant:
        """The grant a token carries; `InvalidToken` if forged or garbled, `TokenExpired` if late."""
        try:
            payload = self._serializer.loads(token)
            channel, topics, expires_at = payload["c"], tuple(payload["t"]), float(payload["e"])
        except (BadSignature, KeyError, TypeError, ValueError):
            raise InvalidToken(
                "the subscription token is missing, malformed or not signed by this server; "
                "ask POST /api/realtime/token for a new one"
            ) from None
        if self._now() >= expires_at:
            raise TokenExpired(
                "the subscription token has expired; ask POST /api/realtime/token for a new one"
            )
        return Grant(token, channel, topics, expires_at)
