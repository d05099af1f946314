"""Publishing for `make bench`: POST /api/realtime/publish paced on a schedule, or as fast as accepted."""
from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Callable

from clients import BenchTimeout
from server import PUBLISH_KEY, BenchServer

TOPIC = "tick"


class Publisher:
    """POST /api/realtime/publish over one keep-alive connection; returns (id, sent, acknowledged).

    `path` and `topic` serve the peers of peers.py too: their publish endpoints take
    `{"channel", "data"}` at another path and answer `{"id"}` as well.
    """

    def __init__(self, server: BenchServer, channel: str, *, path: str = "/api/realtime/publish",
                 topic: str | None = TOPIC) -> None:
        self._conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        self._headers = {"Content-Type": "application/json"}
        if path == "/api/realtime/publish":
            self._headers["Authorization"] = f"Bearer {PUBLISH_KEY}"
        self._path, self._topic = path, topic
        self._channel = channel
        self._n = 0

    def publish(self, channel: str | None = None) -> tuple[int, float, float]:
        """One message on this publisher's channel, or on `channel`."""
        self._n += 1
        message = {"channel": channel or self._channel, "data": {"n": self._n}}
        if self._topic is not None:
            message["topic"] = self._topic
        body = json.dumps(message)
        sent = time.monotonic()
        self._conn.request("POST", self._path, body, self._headers)
        response = self._conn.getresponse()
        payload = response.read()
        acknowledged = time.monotonic()
        if response.status != 201:
            raise RuntimeError(f"publish answered {response.status}: {payload[:300]!r}")
        return json.loads(payload)["id"], sent, acknowledged

    def close(self) -> None:
        self._conn.close()


def run_publishers(make: Callable[[], Publisher], connections: int,
                   next_due: Callable[[], tuple[float, str | None] | None], deadline: float,
                   channel_of: dict[int, str] | None = None) -> list[tuple]:
    """`connections` threads, each with a publisher from `make`, publishing whenever `next_due()`
    gives it (due time, channel or None for the publisher's own); None: done."""
    sends: list[tuple] = []
    failures: list[BaseException] = []

    def loop() -> None:
        publisher = make()
        try:
            while (due := next_due()) is not None:
                at, channel = due
                delay = at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                sent = publisher.publish(channel)
                sends.append(sent)
                if channel_of is not None and channel is not None:
                    channel_of[sent[0]] = channel
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            failures.append(exc)
        finally:
            publisher.close()

    threads = [threading.Thread(target=loop) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic()))
    if failures:
        raise failures[0]
    if any(t.is_alive() for t in threads):
        raise BenchTimeout("a publisher did not finish")
    return sends


def paced(make: Callable[[], Publisher], rate: float, seconds: float, connections: int = 4, *,
          channels: list[str] | None = None, channel_of: dict[int, str] | None = None,
          until: threading.Event | None = None) -> list[tuple]:
    """`rate` messages per second on a fixed schedule, open loop, for `seconds` (or until `until` is set).

    Message k is due at start + k/rate. Several connections take turns, so one
    slow answer does not delay the messages due after it (no coordinated
    omission); only when all of them are busy does a message go out late.
    With `channels`, message k goes to channels[k % len(channels)], and
    `channel_of` records where each id went.
    """
    count = max(1, round(rate * seconds))
    start = time.monotonic() + 0.05
    lock = threading.Lock()
    k = 0

    def next_due() -> tuple[float, str | None] | None:
        nonlocal k
        with lock:
            if (k >= count) if until is None else until.is_set():
                return None
            k += 1
            return start + (k - 1) / rate, channels[(k - 1) % len(channels)] if channels else None

    return run_publishers(make, connections, next_due, start + seconds + 120, channel_of)


def burst(make: Callable[[], Publisher], publishers: int, seconds: float, max_messages: int | None = None) -> list[tuple]:
    """Back to back on `publishers` connections, for `seconds` or `max_messages`, whichever first."""
    end = time.monotonic() + seconds
    lock = threading.Lock()
    taken = 0

    def next_due() -> tuple[float, None] | None:
        nonlocal taken
        with lock:
            if (max_messages is not None and taken >= max_messages) or time.monotonic() >= end:
                return None
            taken += 1
            return 0.0, None

    return run_publishers(make, publishers, next_due, end + 60)


def publish_paced(server: BenchServer, channel: str, rate: float, seconds: float, connections: int = 4,
                  channels: list[str] | None = None, channel_of: dict[int, str] | None = None,
                  until: threading.Event | None = None) -> list[tuple]:
    """`paced` through this project's publish endpoint, on `channel` (or round robin on `channels`)."""
    return paced(lambda: Publisher(server, channel), rate, seconds, connections, channels=channels,
                 channel_of=channel_of, until=until)


def publish_burst(server: BenchServer, channel: str, publishers: int, seconds: float) -> list[tuple]:
    """`burst` through this project's publish endpoint."""
    return burst(lambda: Publisher(server, channel), publishers, seconds)
