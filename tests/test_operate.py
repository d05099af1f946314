"""What an operator sees: /metrics summed over the workers, JSON logs without secrets (issue 9).

Against a real gunicorn with two gevent workers: the multiprocess metrics
directory set up by gunicorn.conf.py, parsed with prometheus_client's own
parser; the log file read line by line as JSON.
"""
from __future__ import annotations

import json

import httpx
import pytest

from conftest import PUBLISH_KEY, LiveServer, wait_until
from sseclient import events_of, open_stream, other_epoch, read_frames, streams_open

pytestmark = pytest.mark.integration


def publish(server: LiveServer, channel: str, data: object) -> dict:
    return server.publish(channel, "t", data)


def test_metrics_are_summed_over_the_workers_and_name_no_channel(start_server, tmp_path):
    server = start_server(f"sqlite:///{tmp_path / 'metrics.sqlite3'}", workers=2, DEMO_ENABLED=True)
    channel = "metrics.secret-channel-name"
    token = server.token(channel, ["t"])
    published = [publish(server, channel, n) for n in range(12)]  # the kernel spreads them over both workers
    cursor = None
    with open_stream(server, token) as stream:
        frames = read_frames(events_of(stream), 12)
        cursor = frames[5].id
        wait_until(lambda: streams_open(server) == 1, what="one open stream in /metrics")
    with open_stream(server, token, header_cursor=cursor) as stream:
        items = events_of(stream)
        assert len(read_frames(items, 6)) == 6
        # Now live: each message is timed from its publish to its frame handed to the streams, once
        # per worker that has one: only this stream once the first one's end was noticed (at its
        # next keep-alive). The 12 above came by replay, maybe some live as well: count from here.
        wait_until(lambda: streams_open(server) == 1, what="the first stream ended in /metrics")
        timed = server.metric("realtime_publish_to_send_seconds_count")
        live = [publish(server, channel, n) for n in range(12, 15)]
        assert [f.envelope for f in read_frames(items, 3)] == live
    published += live
    with open_stream(server, token, header_cursor=f"{other_epoch(cursor)}-3") as stream:
        assert read_frames(events_of(stream), 1)[0].event == "reset"
    wait_until(lambda: streams_open(server) == 0, what="the streams closed in /metrics")

    scrapes = [server.metrics() for _ in range(6)]  # each lands on either worker: the same sums
    for metrics in scrapes:
        assert metrics["realtime_messages_published_total"] == len(published)
        assert metrics["realtime_streams_opened_total"] == 3
        assert metrics['realtime_resumes_total{result="exact"}'] == 1
        assert metrics['realtime_resumes_total{result="unknown_cursor"}'] == 1
        assert metrics['realtime_streams_closed_total{reason="client_gone"}'] == 3
        assert metrics["realtime_streams_open"] == 0
        assert metrics["realtime_frames_sent_total"] >= 12 + 9 + 15
        # Once per message and worker with a subscriber: this stream's, and maybe a worker that has
        # not yet noticed the first stream's end (under load its keep-alive write comes late).
        assert timed + len(live) <= metrics["realtime_publish_to_send_seconds_count"] <= timed + 2 * len(live)
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert channel not in text and "secret-channel-name" not in text


def test_metrics_key_protects_the_endpoint(start_server, tmp_path):
    server = start_server(f"sqlite:///{tmp_path / 'key.sqlite3'}", workers=1, env={"METRICS_KEY": "scrape-key"})
    assert httpx.get(server.url + "/metrics", timeout=10).status_code == 401
    wrong = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_metrics_key"
    right = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer scrape-key"}, timeout=10)
    assert right.status_code == 200 and "realtime_streams_open" in right.text


def test_json_logs_one_object_per_line_and_never_a_secret(start_server, tmp_path):
    server = start_server(f"sqlite:///{tmp_path / 'logs.sqlite3'}", workers=1, DEMO_ENABLED=True, env={"LOG_FORMAT": "json"})
    token = server.token("logs.1", ["t"])
    secret_data = "message-data-that-must-not-be-logged"
    with open_stream(server, token) as stream:
        items = events_of(stream)
        next(items)
        publish(server, "logs.1", secret_data)
        read_frames(items, 1)
    request_id = "req-1234"
    httpx.get(server.url + "/readyz", headers={"X-Request-ID": request_id}, timeout=10)
    wait_until(lambda: any('"stream ended' in line for line in server.log_path.read_text().splitlines()),
               what="the stream's last log line")
    server.stop()

    lines = server.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records), records[:3]
    text = "\n".join(lines)
    for secret in (token, PUBLISH_KEY, "live-test-secret", secret_data):
        assert secret not in text
    ended = [r for r in records if r["message"].startswith("stream ended")]
    assert len(ended) == 1
    assert {"channel_hash", "close_reason", "duration_s", "frames", "bytes", "request_id"} <= set(ended[0])
    assert ended[0]["close_reason"] in ("client_gone", "shutdown") and ended[0]["frames"] == 1
    assert "logs.1" not in json.dumps(ended[0])
    access = [r for r in records if r["logger"] == "gunicorn.access"]
    [ready] = [r for r in access if r.get("path") == "/readyz"]
    assert {"method": "GET", "status": 200, "request_id": request_id}.items() <= ready.items()
    assert any(r.get("path") == "/api/realtime/subscribe" for r in access), "the path, never its query"


def test_a_history_read_with_a_cursor_counts_as_a_resume(client, realtime):
    """realtime_resumes_total counts streams and history reads that came with a cursor."""
    from prometheus_client import REGISTRY

    def resumes(result: str) -> float:
        return REGISTRY.get_sample_value("realtime_resumes_total", {"result": result}) or 0.0

    first = realtime.publish("c", "t", 1)
    token = realtime.create_token("c", ["t"]).token
    exact, unknown = resumes("exact"), resumes("unknown_cursor")
    assert client.get("/api/realtime/messages", query_string={"token": token}).status_code == 200
    assert resumes("exact") == exact, "no cursor: no resume"
    cursor = f"{realtime.store.epoch}-{first.id}"
    assert client.get("/api/realtime/messages", query_string={"token": token, "after": cursor}).status_code == 200
    assert resumes("exact") == exact + 1
    assert client.get("/api/realtime/messages", query_string={"token": token, "after": "00000000-1"}).status_code == 200
    assert resumes("unknown_cursor") == unknown + 1
