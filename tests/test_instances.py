"""Many instances, one database (CONTRACT §7): two gunicorn instances, as on two machines,
share one PostgreSQL database. A message published on either reaches the streams of both,
and a client that hops from one to the other at every reconnect resumes exactly."""
from __future__ import annotations

import threading

import httpx
import pytest

from conftest import PUBLISH_KEY, LiveServer
from sseclient import Subscriber, assert_exactly_once, publish_sentinels

pytestmark = [pytest.mark.integration, pytest.mark.postgres]

CHANNELS = ["hop.1", "hop.2"]
TOPICS = ["a", "b"]


class Hopper(Subscriber):
    """A subscriber whose every connection goes to the next instance (a load balancer's round robin)."""

    def __init__(self, servers: list[LiveServer], *args, **kwargs) -> None:
        super().__init__(servers[0], *args, **kwargs)
        self.servers = servers
        self.hops = 0

    @property
    def server(self) -> LiveServer:
        return self.servers[self.hops % len(self.servers)]

    @server.setter
    def server(self, value: LiveServer) -> None:
        pass  # set once by Subscriber.__init__; the instance follows `hops`

    def _read(self, response: httpx.Response) -> str:
        try:
            return super()._read(response)
        finally:
            self.hops += 1


class Alternating(threading.Thread):
    """Publishes `count` messages, each to the other instance, on the channels in turn."""

    def __init__(self, servers: list[LiveServer], count: int, offset: int) -> None:
        super().__init__(daemon=True)
        self.servers, self.count, self.offset = servers, count, offset
        self.published: list[dict] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            clients = [httpx.Client(base_url=s.url, timeout=10,
                                    headers={"Authorization": f"Bearer {PUBLISH_KEY}"}) for s in self.servers]
            for n in range(self.count):
                k = n + self.offset
                response = clients[k % 2].post("/api/realtime/publish", json={
                    "channel": CHANNELS[k // 2 % 2], "topic": TOPICS[k // 4 % 2], "data": {"n": n, "by": self.offset}})
                assert response.status_code == 201, response.text
                self.published.append(response.json())
            for client in clients:
                client.close()
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_a_client_hopping_between_two_instances_gets_every_message_once_in_order(start_server, postgres_url):
    servers = [start_server(postgres_url, workers=1, DEMO_ENABLED=True) for _ in range(2)]
    subscribers: list[Subscriber] = []
    for i, channel in enumerate(CHANNELS):
        # One that stays on each instance (it sees the other's publishes live) ...
        subscribers += [Subscriber(servers[0], channel, TOPICS, seed=i), Subscriber(servers[1], channel, ["a"], seed=10 + i)]
        # ... and ones that change instance at every reconnect, dropping often, mid-replay included.
        subscribers += [Hopper(servers, channel, TOPICS, seed=20 + i, drop_probability=0.1),
                        Hopper(servers, channel, ["b"], seed=30 + i, drop_probability=0.2, cursor_in_query=True)]
    for sub in subscribers:
        sub.start()
    publishers = [Alternating(servers, 150, offset) for offset in range(3)]
    for publisher in publishers:
        publisher.start()
    for publisher in publishers:
        publisher.join(timeout=120)
        assert publisher.error is None, publisher.error
    sentinels = publish_sentinels(servers[1], subscribers)
    for sub in subscribers:
        sub.stop()

    expected: dict[tuple[str, str], list[int]] = {}
    for message in sorted([m for p in publishers for m in p.published] + sentinels, key=lambda m: m["id"]):
        expected.setdefault((message["channel"], message["topic"]), []).append(message["id"])
    assert_exactly_once(subscribers, expected)
    hoppers = [s for s in subscribers if isinstance(s, Hopper)]
    assert all(h.hops >= 2 for h in hoppers), [h.hops for h in hoppers]  # each used both instances
    for server in servers:
        assert server.metric("realtime_messages_published_total") >= 200, "both instances took publishes"
