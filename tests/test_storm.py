"""A reconnect storm (issue 10): after a deploy every client reconnects at once, most with the
same cursor. Against one real gevent worker, hundreds of streams resume together from the same
`Last-Event-ID`, 50 messages behind, while publishing goes on: each gets every message after
its cursor exactly once, in order, and the replays share their reads instead of one per stream."""
from __future__ import annotations

import threading

import httpx
import pytest

from conftest import PUBLISH_KEY
from sseclient import Subscriber, assert_exactly_once, publish_sentinels

pytestmark = pytest.mark.integration

STREAMS = 300
CHANNEL = "storm.1"


def _storm(server, publish_on: str) -> float:
    """STREAMS streams resume together from one cursor while 40 messages are published on
    `publish_on`; each gets every message once, in order. Returns the replay reads it took."""
    before = [server.publish(CHANNEL, "t", {"n": n}) for n in range(60)]
    token = server.token(CHANNEL, ["t"])
    page = httpx.get(server.url + "/api/realtime/messages", params={"token": token, "limit": 10}, timeout=10).json()
    cursor = page["cursor"]  # after the 10th message: 50 behind
    reads_before = server.metric('realtime_store_reads_total{kind="replay"}')

    subscribers = [Subscriber(server, CHANNEL, ["t"], seed=n) for n in range(STREAMS)]
    for sub in subscribers:
        sub.cursor = cursor
    during: list[dict] = []

    def publish_during() -> None:
        with httpx.Client(base_url=server.url, timeout=10, headers={"Authorization": f"Bearer {PUBLISH_KEY}"}) as client:
            for n in range(40):
                response = client.post("/api/realtime/publish", json={"channel": publish_on, "topic": "t", "data": {"during": n}})
                assert response.status_code == 201, response.text
                during.append(response.json())

    publisher = threading.Thread(target=publish_during, daemon=True)
    for sub in subscribers:
        sub.start()
    publisher.start()
    publisher.join(timeout=120)
    assert len(during) == 40, "every publish during the storm was stored"
    sentinels = publish_sentinels(server, subscribers)
    for sub in subscribers:
        sub.stopping.set()  # all at once: each notices at its next keep-alive
    for sub in subscribers:
        sub.stop()

    mine = [m for m in during if m["channel"] == CHANNEL]
    expected = {(CHANNEL, "t"): [m["id"] for m in before[10:] + mine + sentinels]}
    assert_exactly_once(subscribers, expected)
    assert all(sub.connections == 1 for sub in subscribers), "no stream was cut by the storm"
    return server.metric('realtime_store_reads_total{kind="replay"}') - reads_before


def test_streams_resuming_together_from_one_cursor_get_every_message_once(start_server, database_url):
    server = start_server(database_url, workers=1, DEMO_ENABLED=True)
    reads = _storm(server, publish_on=CHANNEL)
    assert reads < STREAMS / 2, f"{reads:.0f} reads for {STREAMS} replays from one cursor: they were not shared"


def test_a_storm_let_in_two_at_a_time_while_other_channels_publish(start_server, database_url):
    """Admission spreads the storm over time, and publishing elsewhere moves the worker's position
    on meanwhile: streams that subscribe later still share the pages read before (replay.py)."""
    server = start_server(database_url, workers=1, DEMO_ENABLED=True, REALTIME_STREAM_ADMISSION=2)
    reads = _storm(server, publish_on="storm.elsewhere")
    assert reads < STREAMS / 2, f"{reads:.0f} reads for {STREAMS} replays from one cursor: they were not shared"
