"""realtime.publisher: publishing from a process with DATABASE_URL and no Flask app."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT
from readme import code_block
from realtime.client import subscribe
from realtime.errors import InvalidRequest, MessageTooLarge
from realtime.publisher import Publisher, PublisherConfigError


def test_the_readme_snippet_publishes_from_another_process_to_open_streams(start_server, postgres_url):
    server = start_server(postgres_url, workers=1, DEMO_ENABLED=True)
    with subscribe(server.url, token=server.token("run.42", ["status"])) as messages:
        server.publish("run.42", "status", "first")  # the stream is live once this one arrives
        assert next(messages).data == "first"
        script = code_block("Publisher.from_env()")
        subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=60,
                       env={**os.environ, "DATABASE_URL": postgres_url})
        published = next(messages)
    assert (published.channel, published.topic, published.data) == ("run.42", "status", {"percent": 10})


def test_it_checks_messages_as_the_app_does(app):
    realtime = app.extensions["realtime"]
    with Publisher(app.config["DATABASE_URL"], max_message_bytes=100) as publisher:
        for bad, code in (({"channel": "bad channel"}, "invalid_channel"), ({"topic": ""}, "invalid_topic"),
                          ({"run_id": "x" * 65}, "invalid_run_id"), ({"data": float("nan")}, "invalid_data")):
            message = {"channel": "c", "topic": "t", "data": 1, **bad}
            with pytest.raises(InvalidRequest) as refused:
                publisher.publish(message.pop("channel"), message.pop("topic"), message.pop("data"), **message)
            assert refused.value.code == code
        with pytest.raises(MessageTooLarge):
            publisher.publish("c", "t", "x" * 200)
        with pytest.raises(InvalidRequest, match=r"messages\[1\]"):
            publisher.publish_many([{"channel": "c", "topic": "t", "data": 1}, {"channel": "c", "topic": "t"}])
        assert realtime.store.last_id() == 0

        first = publisher.publish("c", "t", {"n": 1}, run_id="r-1", idempotency_key="k")
        again = publisher.publish("c", "t", {"n": 1}, run_id="r-1", idempotency_key="k")
        batch = publisher.publish_many([{"channel": "c", "topic": "t", "data": n} for n in range(3)])
    assert again.replayed and again.id == first.id
    found, _, _ = realtime.history("c", None, None, 10)
    assert [(m.id, m.data) for m in found] == [(first.id, {"n": 1})] + [(m.id, m.data) for m in batch]


def test_from_env_says_what_is_missing(tmp_path):
    with pytest.raises(PublisherConfigError, match="DATABASE_URL is not set"):
        Publisher.from_env({})
    url = f"sqlite:///{tmp_path / 'env.sqlite3'}"
    with Publisher.from_env({"DATABASE_URL": url, "FLASK_REALTIME_MAX_MESSAGE_BYTES": "10"}) as publisher:
        assert publisher.max_message_bytes == 10
