"""How many streams one worker process, and one token, may hold open (issue 18, item 1).

A stream holds a connection for as long as its client stays, and a gevent worker serves at
most gunicorn's `worker_connections` at once: past that it stops accepting, and whatever is
not a stream waits in the kernel's backlog behind the rest. One 60-second token opened 5,000
streams in 3.4 s, and at two workers x 10,000 `/healthz` timed out for everyone until the
attacker left. Two caps, each counted per process:

- `max_streams`: the stream requests the process holds at once, open or being set up. The
  worker's other connections stay free for what is not a stream: health checks, publishes,
  token requests. Unset, it is `worker_connections` less `reserve_share` (9,500 of
  gunicorn.conf.py's 10,000), which gunicorn.conf.py passes to each worker as it starts. The
  request past it is refused before Flask sees it (admission.py): `503 server_full`.
- `max_per_token`: the streams one token holds open (a page needs one or two). Counted only
  once the view has verified the token's signature, so a forged token cannot use up a real
  one's streams; refused before the stream touches the database: `429 too_many_streams`.
  The default, 4, leaves room for reconnects: a stream whose client vanished without a word
  stays open until a write to it fails, and a token lives 60 s, after which the client asks
  for a new one, with a count of its own.

A token is known here by a hash of what its signature covers (its channels, their topics, the expiry), not
of its text: the signature's last character carries two bits the check ignores, so every
token has four spellings that all verify. The token itself is never kept.

Per process, not per instance: with WEB_CONCURRENCY workers a token may hold that many times
`max_per_token` streams on one instance (the kernel picks each connection's worker), as
Centrifugo limits a user's connections per node. A count the workers share, in the database,
would cost a write as each stream opens and another as it closes, in the storms that replay
sharing and admission keep off the database, and counts to repair after a worker dies. The
per-process caps already keep every worker's last connections free, which is what the attack
took; many tokens (the app's policy decides who gets one) meet `max_streams`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from functools import partial
from typing import Callable

from . import metrics
from .errors import RealtimeError
from .tokens import Grant

log = logging.getLogger(__name__)

Release = Callable[[], None]


class TooManyStreams(RealtimeError):
    """The token already holds its `max_per_token` streams in this process."""

    status = 429
    code = "too_many_streams"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class StreamLimits:
    """The stream requests of one process, in all and by token, against their caps."""

    #: The share of a worker's connections kept for requests that are not streams, when
    #: `max_streams` is unset: 500 of 10,000.
    reserve_share = 0.05

    def __init__(self, *, max_streams: int | None = None, max_per_token: int = 0, retry_after_s: int = 15) -> None:
        self.max_streams = max_streams  # None: unset (fit_connections sets it); 0: no cap
        self._max_streams_set = max_streams is not None
        self.max_per_token = max_per_token  # 0: no cap
        # A token's refused client is told to come back after a heartbeat: a stream learns that
        # its client left only when a keep-alive fails to go out, a heartbeat or two later.
        self.retry_after_s = retry_after_s
        self.open = 0
        self._per_token: dict[bytes, int] = {}  # only tokens holding a stream: at most max_streams keys
        self._lock = threading.Lock()

    def fit_connections(self, worker_connections: int) -> None:
        """Keep `reserve_share` of the worker's connections from streams, unless `max_streams` was set."""
        if not self._max_streams_set:
            self.max_streams = worker_connections - max(1, round(worker_connections * self.reserve_share))
        elif self.max_streams and self.max_streams >= worker_connections:
            log.warning(
                "REALTIME_MAX_STREAMS (%d) leaves none of the worker's %d connections to health checks, "
                "publishes and token requests", self.max_streams, worker_connections,
            )

    def enter(self) -> Release | None:
        """One more stream request in this process: how to leave, or None when it holds max_streams."""
        with self._lock:
            if not self.max_streams or self.open < self.max_streams:
                self.open += 1
                return _Once(self._leave)
        metrics.STREAM_LIMIT_REFUSED.labels("process_full").inc()
        return None

    def claim(self, grant: Grant) -> Release:
        """Count one more stream of this verified token: how to give it back; `TooManyStreams` if it holds all."""
        if not self.max_per_token:
            return _nothing
        key = token_key(grant)
        with self._lock:
            held = self._per_token.get(key, 0)
            if held < self.max_per_token:
                self._per_token[key] = held + 1
                return _Once(partial(self._unclaim, key))
        metrics.STREAM_LIMIT_REFUSED.labels("per_token").inc()
        raise TooManyStreams(
            f"this token already holds {self.max_per_token} streams on this server; close one, "
            f"or try again in {self.retry_after_s} s", retry_after_s=self.retry_after_s,
        )

    def _leave(self) -> None:
        with self._lock:
            self.open -= 1

    def _unclaim(self, key: bytes) -> None:
        with self._lock:
            left = self._per_token[key] - 1
            if left:
                self._per_token[key] = left
            else:
                del self._per_token[key]


def token_key(grant: Grant) -> bytes:
    """A token's name in the counts: a hash of what its signature covers, the same for each spelling."""
    if grant.several:
        signed = json.dumps([{c: list(t) for c, t in grant.channels.items()}, grant.expires_at])
    else:
        signed = json.dumps([grant.channel, list(grant.topics), grant.expires_at])
    return hashlib.sha256(signed.encode()).digest()[:16]


class _Once:
    """A release that runs at most once however often it is called: a response may be closed
    twice (by the server and by a wrapper), and a count given back twice would free another's."""

    __slots__ = ("_release",)  # one per open stream: kept small

    def __init__(self, release: Release) -> None:
        self._release: Release | None = release

    def __call__(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


def _nothing() -> None:
    pass
