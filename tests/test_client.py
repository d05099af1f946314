"""realtime.client: the Python subscriber, against a real gunicorn (and a scripted server for odd answers)."""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from conftest import LiveServer, wait_until
from faultproxy import FaultProxy
from readme import code_block
from sseclient import other_epoch
from realtime.client import Backoff, ClientMessage, ClientReset, SubscribeRefused, subscribe, token_from
from realtime.tokens import TokenIssuer

FAST = Backoff(initial_s=0.05, max_s=0.2, min_s=0.05)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("client")
    live = LiveServer(tmp / "gunicorn.log", f"sqlite:///{tmp / 'client.sqlite3'}", DEMO_ENABLED=True)
    try:
        yield live.start()
    finally:
        live.stop()


def take(messages: Iterator[ClientMessage], count: int) -> list[ClientMessage]:
    return [next(messages) for _ in range(count)]


def test_replays_then_live_with_each_envelope_field(server):
    first = server.publish("client.a", "status", {"percent": 10}, run_id="r1")
    server.publish("client.a", "other", "not for us")
    with subscribe(server.url, token=server.token("client.a", ["status", "log"])) as messages:
        replayed = next(messages)
        live = server.publish("client.a", "log", {"line": "héllo\u2028world"})
        arrived = next(messages)
    assert replayed == ClientMessage(
        id=first["id"], cursor=replayed.cursor, channel="client.a", topic="status", data={"percent": 10},
        run_id="r1", created_at=datetime.fromisoformat(first["created_at"]),
    )
    assert replayed.cursor.endswith(f"-{first['id']}")
    assert (arrived.id, arrived.topic, arrived.data) == (live["id"], "log", {"line": "héllo\u2028world"})
    assert messages.cursor == arrived.cursor


def test_the_readme_snippet_reads_until_the_run_ends(server, capsys):
    server.publish("run.42", "status", {"percent": 50})
    server.publish("run.42", "log", "not asked for")
    server.publish("run.42", "run", {"status": "completed", "output": {"pages": 3}})
    exec(code_block("token_from(BASE").replace("http://127.0.0.1:5000", server.url), {})
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == ["status {'percent': 50}", "run {'status': 'completed', 'output': {'pages': 3}}"]
    assert printed[2].startswith("resume later with last_event_id = ")


def test_resumes_exactly_across_cut_connections(server):
    token = token_from(server.url, "client.b", ["t"])
    published = [server.publish("client.b", "t", n)["id"] for n in range(3)]
    with FaultProxy("127.0.0.1", server.port) as proxy:
        with subscribe(f"http://127.0.0.1:{proxy.port}", token=token, backoff=FAST) as messages:
            received = [m.id for m in take(messages, 3)]
            for round_ in range(3):
                proxy.cut()  # the network drops: published meanwhile, read after the reconnect
                published += [server.publish("client.b", "t", [round_, n])["id"] for n in range(3)]
                proxy.restore()
                received += [m.id for m in take(messages, 3)]
        assert proxy.connections_accepted >= 4
    assert received == published


def test_several_channels_on_one_token_resume_exactly_across_cut_connections(server):
    token = token_from(server.url, {"client.m1": ["t"], "client.m2": ["t", "u"]})
    channels = ["client.m1", "client.m2", "client.m3"]  # m3: not in the token
    published = [server.publish(channels[n % 3], "t", n) for n in range(6)]
    with FaultProxy("127.0.0.1", server.port) as proxy:
        with subscribe(f"http://127.0.0.1:{proxy.port}", token=token, backoff=FAST) as messages:
            received = take(messages, 4)
            for round_ in range(3):
                proxy.cut()
                published += [server.publish(channels[n % 3], "tu"[n % 2], [round_, n]) for n in range(6)]
                proxy.restore()
                received += take(messages, 3)  # m1's t, m2's t and u of the six
        assert proxy.connections_accepted >= 4
    wanted = [m for m in published if m["channel"] == "client.m2" or (m["channel"] == "client.m1" and m["topic"] == "t")]
    assert [(m.id, m.channel, m.topic) for m in received] == [(m["id"], m["channel"], m["topic"]) for m in wanted]


def test_since_adds_a_channel_from_its_beginning_and_the_others_go_on(server):
    early = server.publish("client.s2", "t", "before")
    token = token_from(server.url, {"client.s1": ["t"]})
    with subscribe(server.url, token=token) as first:
        server.publish("client.s1", "t", 1)
        position = next(first).cursor
    later = [server.publish(f"client.s{1 + n % 2}", "t", n)["id"] for n in range(4)]
    both = token_from(server.url, {"client.s1": ["t"], "client.s2": ["t"]})
    with subscribe(server.url, token=both, last_event_id=position, since={"client.s2": None}) as second:
        assert [m.id for m in take(second, 5)] == [early["id"], *later]


def test_cursor_lets_another_subscription_resume(server):
    ids = [server.publish("client.c", "t", n)["id"] for n in range(4)]
    token = server.token("client.c", ["t"])
    with subscribe(server.url, token=token) as first:
        take(first, 2)
        position = first.cursor
    with subscribe(server.url, token=token, last_event_id=position) as second:
        assert [m.id for m in take(second, 2)] == ids[2:]


def test_a_token_callable_is_asked_again_when_the_token_expired(server):
    issuer = TokenIssuer(server.env["SECRET_KEY"])
    grants = [issuer.issue("client.d", ["t"], ttl_s=1.5), issuer.issue("client.d", ["t"], ttl_s=600)]
    calls = []

    def token() -> str:
        calls.append(time.time())
        return grants[len(calls) - 1].token

    ids = [server.publish("client.d", "t", 1)["id"]]
    with FaultProxy("127.0.0.1", server.port) as proxy:
        with subscribe(f"http://127.0.0.1:{proxy.port}", token=token, backoff=FAST) as messages:
            received = [next(messages).id]
            proxy.cut()
            wait_until(lambda: time.time() > grants[0].expires_at + 0.1, what="the first token to expire")
            ids.append(server.publish("client.d", "t", 2)["id"])
            proxy.restore()
            received.append(next(messages).id)
    assert received == ids
    assert len(calls) == 2


def test_a_string_token_that_expired_is_a_clear_error(server):
    token = TokenIssuer(server.env["SECRET_KEY"]).issue("client.e", ["t"], ttl_s=-1).token
    with pytest.raises(SubscribeRefused) as refused:
        next(subscribe(server.url, token=token))
    assert (refused.value.status, refused.value.code) == (401, "token_expired")
    assert "cannot be renewed" in str(refused.value)


def test_other_4xx_are_raised_not_retried(server):
    token = server.token("client.f", ["t"])
    with pytest.raises(SubscribeRefused) as refused:
        next(subscribe(server.url, token=token, last_event_id="not-a-cursor"))
    assert (refused.value.status, refused.value.code) == (400, "invalid_last_event_id")
    with pytest.raises(SubscribeRefused) as refused:
        next(subscribe(server.url, token=token, topics=["elsewhere"]))
    assert refused.value.status == 403
    with pytest.raises(SubscribeRefused) as refused:
        next(subscribe(server.url + "/nowhere", token=token))
    assert refused.value.status == 404
    with pytest.raises(TypeError, match="string or a callable"):
        subscribe(server.url, token=None)


def test_reset_is_reported_and_the_stream_goes_on_from_its_cursor(server):
    first = server.publish("client.g", "t", "oldest")
    token = server.token("client.g", ["t"])
    resets: list[ClientReset] = []
    with subscribe(server.url, token=token) as found:
        cursor = next(found).cursor
    foreign = f"{other_epoch(cursor)}-{first['id']}"
    with subscribe(server.url, token=token, last_event_id=foreign, on_reset=resets.append) as messages:
        assert next(messages).id == first["id"]
        assert messages.last_reset == resets[0]
    assert resets[0].reason == "unknown_cursor"


def test_close_from_another_thread_ends_a_blocked_read(server):
    messages = subscribe(server.url, token=server.token("client.h", ["t"]))
    ended = threading.Event()

    def read() -> None:
        for _ in messages:
            pass
        ended.set()

    reader = threading.Thread(target=read)
    reader.start()
    wait_until(lambda: messages._socket is not None, what="the stream to open")
    messages.close()
    reader.join(timeout=10)
    assert ended.is_set()


# -- answers a healthy server does not give: a scripted one ------------------------------------


class Scripted(ThreadingHTTPServer):
    """Answers each GET with the next scripted (status, headers, body) and records the requests."""

    daemon_threads = True

    def __init__(self, script: list[tuple[int, dict[str, str], str]]) -> None:
        self.script = script
        self.requests: list[tuple[float, dict[str, str]]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(handler) -> None:  # noqa: N805
                self.requests.append((time.monotonic(), dict(handler.headers)))
                status, headers, body = self.script.pop(0) if self.script else (500, {}, "")
                handler.send_response(status)
                for name, value in {"Content-Length": str(len(body.encode())), **headers}.items():
                    handler.send_header(name, value)
                handler.end_headers()
                handler.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=10)


def frame(cursor: str, n: int) -> str:
    envelope = {"id": n, "channel": "c", "topic": "t", "data": n, "run_id": None,
                "created_at": "2026-11-28T06:00:00.000000+00:00"}
    return f"id: {cursor}\nevent: t\ndata: {json.dumps(envelope)}\n\n"


SSE = {"Content-Type": "text/event-stream"}


def test_backs_off_on_5xx_honours_retry_after_and_retry():
    scripted = Scripted([
        (503, {"Retry-After": "1", "Content-Type": "application/json"},
         '{"error": {"code": "database_unavailable", "message": "later"}}'),
        (502, {}, "bad gateway"),
        (200, SSE, "retry: 300\n\n" + frame("e-1", 1)),  # then the server ends the stream
        (200, SSE, frame("e-2", 2)),
    ])
    try:
        with subscribe(scripted.url, token="t", backoff=FAST) as messages:
            assert [m.id for m in take(messages, 2)] == [1, 2]
    finally:
        scripted.stop()
    times = [at for at, _ in scripted.requests]
    assert times[1] - times[0] >= 1.0  # Retry-After
    assert times[3] - times[2] >= 0.15  # half of retry: at least, with jitter
    assert [headers.get("Last-Event-ID") for _, headers in scripted.requests] == [None, None, None, "e-1"]
    assert all(headers["Authorization"] == "Bearer t" for _, headers in scripted.requests)


def test_a_page_that_is_not_an_event_stream_is_a_clear_error():
    scripted = Scripted([(200, {"Content-Type": "text/html"}, "<html>login</html>")])
    try:
        with pytest.raises(SubscribeRefused, match="base URL"):
            next(subscribe(scripted.url, token="t"))
    finally:
        scripted.stop()
