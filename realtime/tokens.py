"""Subscription tokens: which channels and topics a client may watch, until when.

The server signs them with its SECRET_KEY (itsdangerous, HMAC-SHA1 over a
salted key) and hands them to the browser, so the key itself never leaves the
server (Inngest's `getSubscriptionToken`, Mercure's subscriber JWT). A token is
checked when a stream opens; a stream already open outlives it, and a client
that reconnects later asks for a new one.

The expiry travels inside the signed payload, and `now` is injected, so tests
move the clock instead of sleeping.

A token names one channel (`{"c", "t", "e"}`, the form since the first
version) or several (`{"m": {channel: topics}, "e"}`, docs/protocol.md §12).
The serializer compresses a payload with zlib when that makes it shorter, and
only a payload whose signature verified is ever decompressed; a page of runs
named alike (`run.<id>` with the same topics) compresses well. A token must
still fit in a URL, where EventSource sends it: one for several channels is
refused past MAX_TOKEN_CHARS, about the longest a single channel's can be.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Sequence

from itsdangerous import BadData, URLSafeSerializer

from .errors import InvalidRequest, InvalidToken, TokenExpired
from .names import check_channel, check_channels, check_topics

#: The longest token for several channels, in characters: about the longest a one-channel token
#: can be (a 200-character channel, 50 topics of 100), which fits in a URL (gunicorn's request
#: line holds 8,190 bytes) with a cursor and `since` beside it.
MAX_TOKEN_CHARS = 6000


@dataclass(frozen=True)
class Grant:
    """What a valid token allows: these channels, each with its topics, until `expires_at` (Unix time).

    `channel` and `topics` name the one channel of a single-channel token (None and () for a
    token of several); `channels` maps every granted channel to its topics, in both forms.
    """

    token: str
    channel: str | None
    topics: tuple[str, ...]
    expires_at: float
    channels: Mapping[str, tuple[str, ...]] = None  # type: ignore[assignment]  # set from channel, topics

    def __post_init__(self) -> None:
        if self.channels is None:
            object.__setattr__(self, "channels", {self.channel: self.topics})

    @property
    def several(self) -> bool:
        """A token of the `channels` form (docs/protocol.md §12), even for one channel."""
        return self.channel is None

    def to_json(self) -> dict[str, Any]:
        """The body of `POST /api/realtime/token` (docs/protocol.md §5, §12)."""
        expires_at = datetime.fromtimestamp(self.expires_at, timezone.utc).isoformat(timespec="seconds")
        if self.several:
            channels = {channel: list(topics) for channel, topics in self.channels.items()}
            return {"token": self.token, "channels": channels, "expires_at": expires_at}
        return {"token": self.token, "channel": self.channel, "topics": list(self.topics), "expires_at": expires_at}


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

    def issue_for(self, channels: Mapping[str, Sequence[str]], ttl_s: float | None = None) -> Grant:
        """A token for 1-100 channels, each with its own 1-50 topics (docs/protocol.md §12)."""
        granted = check_channels(channels)
        expires_at = self._now() + (self.ttl_s if ttl_s is None else ttl_s)
        token = self._serializer.dumps({"m": {c: list(t) for c, t in granted.items()}, "e": expires_at})
        if len(token) > MAX_TOKEN_CHARS:
            raise InvalidRequest(
                f"these channels and topics make a token of {len(token)} characters, longer than a URL may "
                f"carry ({MAX_TOKEN_CHARS}): ask for fewer channels or shorter names", code="invalid_channel",
            )
        return Grant(token, None, (), expires_at, granted)

    def verify(self, token: str) -> Grant:
        """The grant a token carries; `InvalidToken` if forged, garbled or odd, `TokenExpired` if late."""
        try:
            channel, topics, expires_at, channels = _read_payload(self._serializer.loads(token))
        except (BadData, InvalidRequest, ValueError, OverflowError):
            raise InvalidToken(
                "the subscription token is missing, malformed or not signed by this server; "
                "ask POST /api/realtime/token for a new one"
            ) from None
        if self._now() >= expires_at:
            raise TokenExpired(
                "the subscription token has expired; ask POST /api/realtime/token for a new one"
            )
        return Grant(token, channel, topics, expires_at, channels)


def _read_payload(
    payload: Any,
) -> tuple[str | None, tuple[str, ...], float, Mapping[str, tuple[str, ...]] | None]:
    """What `issue` signed, checked by the same rules as there.

    A good signature proves who signed a payload (this key, maybe an older
    version or another caller of the serializer), not its shape: an odd
    name or type must be refused here, not fail downstream as a 500.
    """
    if not isinstance(payload, dict) or payload.keys() not in ({"c", "t", "e"}, {"m", "e"}):
        raise ValueError("not a subscription token payload")
    expires_at = payload["e"]
    if isinstance(expires_at, bool) or not isinstance(expires_at, (int, float)) or not math.isfinite(expires_at):
        raise ValueError("the expiry is not a time")  # NaN would never expire; 10**400 overflows math.isfinite
    if "m" in payload:
        return None, (), float(expires_at), check_channels(payload["m"])
    return check_channel(payload["c"]), check_topics(payload["t"]), float(expires_at), None
