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

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

from itsdangerous import BadData, URLSafeSerializer

from .errors import InvalidRequest, InvalidToken, TokenExpired
from .names import check_channel, check_topics


@dataclass(frozen=True)
class Grant:
    """What a valid token allows: this channel, these topics, until `expires_at` (Unix time)."""

    token: str
    channel: str
    topics: tuple[str, ...]
    expires_at: float

    def to_json(self) -> dict[str, Any]:
        """The body of `POST /api/realtime/token` (docs/protocol.md §5)."""
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
        """The grant a token carries; `InvalidToken` if forged, garbled or odd, `TokenExpired` if late."""
        try:
            channel, topics, expires_at = _read_payload(self._serializer.loads(token))
        except (BadData, InvalidRequest, ValueError, OverflowError):
            raise InvalidToken(
                "the subscription token is missing, malformed or not signed by this server; "
                "ask POST /api/realtime/token for a new one"
            ) from None
        if self._now() >= expires_at:
            raise TokenExpired(
                "the subscription token has expired; ask POST /api/realtime/token for a new one"
            )
        return Grant(token, channel, topics, expires_at)


def _read_payload(payload: Any) -> tuple[str, tuple[str, ...], float]:
    """What `issue` signed, checked by the same rules as there.

    A good signature proves who signed a payload (this key, maybe an older
    version or another caller of the serializer), not its shape: an odd
    name or type must be refused here, not fail downstream as a 500.
    """
    if not isinstance(payload, dict) or payload.keys() != {"c", "t", "e"}:
        raise ValueError("not a subscription token payload")
    expires_at = payload["e"]
    if isinstance(expires_at, bool) or not isinstance(expires_at, (int, float)) or not math.isfinite(expires_at):
        raise ValueError("the expiry is not a time")  # NaN would never expire; 10**400 overflows math.isfinite
    return check_channel(payload["c"]), check_topics(payload["t"]), float(expires_at)
