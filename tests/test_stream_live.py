"""The event stream against a real `gunicorn -c gunicorn.conf.py` (CONTRACT §3-§4, issue 2).

What a subscriber depends on, checked on parsed events (never on how bytes
were chunked), on SQLite and on PostgreSQL: replay then live, headers,
resume from a cursor, heartbeats and reset frames. Exactly-once delivery
under reconnect chaos, worker crashes, reloads and shutdowns is in
test_stream_chaos.py; the SSE client both use is tests/sseclient.py.

Tests that only read and publish share one server per backend
(`shared_server`, each test on its own channels); tests that kill, reload or
reconfigure the server start their own.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from datetime import datetime

import httpx
import pytest

from conftest import ROOT, wait_until
from sseclient import Frame, events_of, open_stream, other_epoch, parse_sse, read_frames, sse_lines, stream_frames

pytestmark = pytest.mark.integration

ENVELOPE_KEYS = ["id", "channel", "topic", "data", "run_id", "created_at"]
RETRY_MS = 200  # what LiveServer sets


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path) -> str:
    """conftest's `database_url`, with the PostgreSQL run marked `postgres`."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'live.sqlite3'}"
    return request.getfixturevalue("postgres_url")


# -- 1. replay then live ---------------------------------------------------------------------


def test_replay_then_live_frames_and_headers(shared_server):
    server = shared_server
    published = [
        server.publish("replay.1", "status", {"percent": 10}, run_id="run-1"),
        server.publish("replay.1", "hidden", {"not": "in the token"}),
        server.publish("replay.other", "status", {"other": "channel"}),
        server.publish("replay.1", "log", {"line": "é ✓ \u2028 \n"}),
    ]
    token = server.token("replay.1", ["status", "log"])

    with open_stream(server, token) as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        items = events_of(response)
        first = next(items)
        assert first == Frame(None, "message", "", RETRY_MS), "the first frame is `retry:`"
        replayed = read_frames(items, 2)
        live_published = [
            server.publish("replay.1", "log", [1, 2, 3]),
            server.publish("replay.1", "hidden", "nope"),
            server.publish("replay.other", "log", "nope"),
            server.publish("replay.1", "status", None, run_id="run-2"),
        ]
        live = read_frames(items, 2)

    expected = [published[0], published[3], live_published[0], live_published[3]]
    frames = replayed + live
    assert [f.envelope for f in frames] == expected, "replay oldest first, then live, only the token's topics"
    assert [f.event for f in frames] == [e["topic"] for e in expected]
    for frame in frames:
        assert list(frame.envelope) == ENVELOPE_KEYS
        assert datetime.fromisoformat(frame.envelope["created_at"]).utcoffset() is not None
    # `id:` is the cursor /messages hands out after that same message.
    for n, frame in enumerate(frames, start=1):
        body = httpx.get(server.url + "/api/realtime/messages",
                         params={"token": token, "limit": str(n)}, timeout=10).json()
        assert body["cursor"] == frame.id
    assert len({f.id for f in frames}) == len(frames)


def test_headers_and_retry_arrive_before_any_message(shared_server):
    server = shared_server
    token = server.token("empty.1", ["t"])
    with open_stream(server, token) as response:
        # We are here, with status and headers, while the channel is still empty.
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        raw = b""
        chunks = response.iter_raw()
        while len(raw) < len(b"retry: 200\n\n"):
            raw += next(chunks)
        assert raw.startswith(b"retry: 200\n\n"), raw
        published = server.publish("empty.1", "t", {"first": True})
        while not message_frames(raw):
            raw += next(chunks)
    assert message_frames(raw)[0].envelope == published


def message_frames(raw: bytes) -> list[Frame]:
    return [f for f in parse_sse(raw.decode().split("\n")) if isinstance(f, Frame) and f.data]


# -- 2. resume -------------------------------------------------------------------------------


def test_resume_from_header_and_from_query_header_wins(shared_server):
    server = shared_server
    ids = [server.publish("resume.1", "t", n)["id"] for n in range(5)]
    token = server.token("resume.1", ["t"])
    cursors = [f.id for f in stream_frames(server, token, 5)]

    from_header = stream_frames(server, token, 3, header_cursor=cursors[1])
    assert [f.envelope["id"] for f in from_header] == ids[2:]
    from_query = stream_frames(server, token, 3, query_cursor=cursors[1])
    assert [f.envelope["id"] for f in from_query] == ids[2:]
    bearer_and_query = stream_frames(server, token, 2, query_cursor=cursors[2], bearer=True)
    assert [f.envelope["id"] for f in bearer_and_query] == ids[3:]
    # Both: the header (what EventSource sends on reconnect) wins.
    both = stream_frames(server, token, 1, header_cursor=cursors[3], query_cursor=cursors[0])
    assert [f.envelope["id"] for f in both] == ids[4:]
    # Resuming at the newest message replays nothing, then goes live.
    with open_stream(server, token, header_cursor=cursors[4]) as response:
        items = events_of(response)
        next(items)
        live = server.publish("resume.1", "t", "live")
        assert read_frames(items, 1)[0].envelope == live


# -- 6. heartbeats ---------------------------------------------------------------------------


def test_idle_stream_sends_keep_alive_comments(shared_server):
    """An idle stream carries only keep-alive comments. Their timing, at least one every
    REALTIME_HEARTBEAT_S, is tested with an injected clock (tests/test_dispatch.py)."""
    server = shared_server
    token = server.token("idle.1", ["t"])
    with open_stream(server, token) as response:
        lines = sse_lines(response)
        assert [next(lines), next(lines)] == [f"retry: {RETRY_MS}", ""]
        assert [next(lines) for _ in range(6)] == [": keep-alive", ""] * 3


# -- 7. reset frames -------------------------------------------------------------------------


def test_cursor_from_another_database_gets_unknown_cursor_reset(shared_server):
    server = shared_server
    ids = [server.publish("reset.1", "t", n)["id"] for n in range(3)]
    token = server.token("reset.1", ["t"])
    real = stream_frames(server, token, 1)[0].id
    foreign = f"{other_epoch(real)}-{ids[-1]}"

    with open_stream(server, token, header_cursor=foreign) as response:
        frames = read_frames(events_of(response), 4)
    reset, replay = frames[0], frames[1:]
    assert reset.event == "reset"
    assert json.loads(reset.data) == {"reason": "unknown_cursor", "cursor": reset.id}
    assert [f.envelope["id"] for f in replay] == ids, "then every retained message"
    # The reset's id resumes right after it: the same messages, no second reset.
    again = stream_frames(server, token, 3, header_cursor=reset.id)
    assert [f.event for f in again] == ["t"] * 3
    assert [f.envelope["id"] for f in again] == ids


def test_cursor_older_than_pruned_history_gets_history_truncated(start_server, database_url):
    server = start_server(database_url, DEMO_ENABLED=True, REALTIME_RETENTION_S=1)
    old = [server.publish("trunc.1", "t", n) for n in range(3)]
    server.publish("trunc.other", "t", "also old")
    token = server.token("trunc.1", ["t"])
    cursors = [f.id for f in stream_frames(server, token, 3)]
    newest_old = datetime.fromisoformat(old[-1]["created_at"]).timestamp()
    wait_until(lambda: time.time() > newest_old + 1.05, what="the first messages to pass retention")

    env = {**os.environ, "DATABASE_URL": server.database_url, "SECRET_KEY": "live-test-secret",
           "FLASK_REALTIME_RETENTION_S": "1"}
    pruned = subprocess.run([sys.executable, "-m", "flask", "--app", "app", "realtime", "prune"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert pruned.returncode == 0, pruned.stderr
    assert "pruned 4 messages" in pruned.stdout
    kept = [server.publish("trunc.1", "t", n)["id"] for n in range(3, 5)]

    frames = stream_frames(server, token, 3, header_cursor=cursors[0])
    reset = frames[0]
    assert reset.event == "reset"
    assert json.loads(reset.data) == {"reason": "history_truncated", "cursor": reset.id}
    assert [f.envelope["id"] for f in frames[1:]] == kept, "continues from the oldest retained message"
    after_reset = stream_frames(server, token, 2, header_cursor=reset.id)
    assert [(f.event, f.envelope["id"]) for f in after_reset] == [("t", i) for i in kept]
    # A client that saw the last pruned message lost nothing: no reset.
    seen_all = stream_frames(server, token, 2, query_cursor=cursors[-1])
    assert [(f.event, f.envelope["id"]) for f in seen_all] == [("t", i) for i in kept]


# -- valid input a browser must be able to send ------------------------------------------------


def test_largest_valid_token_works_in_the_query(shared_server):
    """EventSource cannot set headers, so a browser sends the token as `?token=` (CONTRACT §3)."""
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-"
    rng = random.Random(1)
    channel = "".join(rng.choice(alphabet) for _ in range(200))
    topics = ["".join(rng.choice(alphabet) for _ in range(100)) for _ in range(50)]
    token = shared_server.token(channel, topics)
    published = shared_server.publish(channel, topics[-1], "big token")
    with open_stream(shared_server, token) as response:
        assert response.status_code == 200, (response.status_code, response.read()[:200])
        assert read_frames(events_of(response), 1)[0].envelope == published
