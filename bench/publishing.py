"""Publishing for `make bench`: POST /api/realtime/publish paced on a schedule, or as fast as accepted."""
from __future__ import annotations

import http.client
import json
import threading
import time

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


def publish_paced(server: BenchServer, channel: str, rate: float, seconds: float, connections: int = 4,
                  channels: list[str] | None = None, channel_of: dict[int, str] | None = None) -> list[tuple]:
    """`rate` messages per second on a fixed schedule, open loop.

    Message k is due at start + k/rate. Several connections take turns, so one
    slow answer does not delay the messages due after it (no coordinated
    omission); only when all of them are busy does a message go out late.
    With `channels`, message k goes to channels[k % len(channels)], and
    `channel_of` records where each id went.
    """
    count = max(1, round(rate * seconds))
    start = time.monotonic() + 0.05
    due = iter(range(count))
    lock = threading.Lock()
    sends: list[tuple] = []
    failures: list[BaseException] = []

    def loop() -> None:
        publisher = Publisher(server, channel)
        try:
            while True:
                with lock:
                    k = next(due, None)
                if k is None:
                    return
                delay = start + k / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                to = channels[k % len(channels)] if channels else channel
                sent = publisher.publish(to)
                sends.append(sent)
                if channel_of is not None:
                    channel_of[sent[0]] = to
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            failures.append(exc)
        finally:
            publisher.close()

    threads = [threading.Thread(target=loop) for _ in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 120)
    if failures:
        raise failures[0]
    return sends


def publish_burst(server: BenchServer, channel: str, publishers: int, seconds: float) -> list[tuple]:
    """`publishers` connections publishing back to back for `seconds`."""
    deadline = time.monotonic() + seconds
    results: list[list[tuple]] = [[] for _ in range(publishers)]
    failures: list[BaseException] = []

    def loop(sends: list[tuple]) -> None:
        publisher = Publisher(server, channel)
        try:
            while time.monotonic() < deadline:
                sends.append(publisher.publish())
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            failures.append(exc)
        finally:
            publisher.close()

    threads = [threading.Thread(target=loop, args=(r,)) for r in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    if failures:
        raise failures[0]
    return [s for r in results for s in r]
