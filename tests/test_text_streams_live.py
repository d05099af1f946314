"""Text streams through a real gunicorn with gevent workers, on SQLite and PostgreSQL (issue 20).

A generation is written by `Publisher.text_stream` in this process (as a task
queue's worker would), while SSE clients read it, drop their connections at
random points and resume with their cursor. Whatever the points, the client's
text must be the written text: no gap, no repeat.
"""
from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import subprocess
import threading

import pytest

from conftest import ROOT, skip_or_fail, wait_until
from realtime.publisher import Publisher
from sseclient import Frame, events_of, open_stream

pytestmark = pytest.mark.integration

PIECES = ["The", " answer", " is", " forty", "-two", ",", " of", " course", ".", "\n", " É", "漢字", ' "q"', " \\"]


class TextClient:
    """The client rule of docs/protocol.md §11, applied to frames as they arrive."""

    def __init__(self) -> None:
        self.text, self.seq, self.status = "", None, None
        self.others: list[int] = []
        self.cursor: str | None = None
        self.frames = 0

    def apply(self, frame: Frame) -> None:
        envelope = frame.envelope
        self.cursor = frame.id
        self.frames += 1
        data = envelope["data"]
        if not (isinstance(data, dict) and "text_stream" in data):
            self.others.append(envelope["id"])
        elif "text" in data:
            self.text, self.seq, self.status = data["text"], data["seq"], data.get("status")
        elif self.seq is not None and data["seq"] == self.seq + 1:
            self.text, self.seq, self.status = self.text + data["delta"], data["seq"], data.get("status")


def test_a_client_that_drops_its_connection_200_times_ends_with_the_written_text(shared_server):
    server = shared_server
    channel = f"gen.{random.randrange(10**9)}"
    rng = random.Random(20)
    written: list[str] = []
    reconnects = 0
    failures: list[BaseException] = []
    reader_done = threading.Event()

    def write() -> None:
        """A generation at a model's pace that goes on until the client dropped its stream 200 times."""
        try:
            with Publisher(server.database_url, text_flush_ms=5) as publisher:
                with publisher.text_stream(channel, "answer") as out:
                    n = 0
                    while reconnects < 200 and not reader_done.is_set():
                        piece = rng.choice(PIECES)
                        out.write(piece)
                        written.append(piece)
                        if n % 200 == 0:
                            publisher.publish(channel, "status", {"written": n})
                        n += 1
                        threading.Event().wait(0.002)  # the model's pace
        except BaseException as exc:  # reported by the test, not lost in the thread
            failures.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    client = TextClient()
    try:
        while client.status is None:
            token = server.token(channel, ["answer", "status"])  # a fresh one: this takes a while
            with open_stream(server, token, header_cursor=client.cursor) as response:
                assert response.status_code == 200, response.read()
                keep = rng.randint(1, 4)
                for item in events_of(response):
                    if isinstance(item, Frame) and item.data:
                        client.apply(item)
                        keep -= 1
                        if keep == 0 or client.status is not None:
                            break
            reconnects += 1
    finally:
        reader_done.set()
        writer.join(timeout=60)
    assert not failures, failures
    assert reconnects >= 200
    assert client.status == "completed"
    assert client.text == "".join(written)
    statuses = len(written) // 200 + (len(written) % 200 > 0)
    assert client.others == sorted(set(client.others)) and len(client.others) == statuses  # each once, in order


def test_a_reload_gets_a_long_answer_in_one_frame_then_the_live_deltas(shared_server):
    server = shared_server
    channel = f"gen.{random.randrange(10**9)}"
    token = server.token(channel, ["answer"])
    whole = "".join(f"token{n} " for n in range(5000))
    with Publisher(server.database_url, text_flush_ms=5) as publisher:
        stream = publisher.text_stream(channel, "answer").__enter__()
        for n in range(5000):
            stream.write(f"token{n} ")
        with contextlib.ExitStack() as streams:

            def first_frame() -> tuple[TextClient, object] | None:
                """A new stream and its first frame: the whole answer, once the worker serving it saw it all."""
                streams.close()  # the previous try's stream
                response = streams.enter_context(open_stream(server, token))
                items = events_of(response)
                client = TextClient()
                client.apply(next(item for item in items if isinstance(item, Frame) and item.data))
                return (client, items) if client.text == whole else None

            client, items = wait_until(first_frame, what="a stream whose first frame is the whole answer")
            stream.write("and the last one")
            stream.__exit__(None, None, None)
            for item in items:
                if isinstance(item, Frame) and item.data:
                    client.apply(item)
                    if client.status is not None:
                        break
    assert client.text == whole + "and the last one" and client.status == "completed"
    assert client.frames == 3  # the folded text, the last delta, the end


@pytest.fixture
def node() -> str:
    executable = shutil.which("node")
    if executable is None:
        skip_or_fail("node is not installed")
    if not (ROOT / "tests" / "node" / "node_modules" / "eventsource").is_dir():
        skip_or_fail("tests/node/node_modules is missing: run `npm ci --prefix tests/node` (make test does)")
    return executable


@pytest.mark.node
def test_realtime_js_on_nodes_eventsource_keeps_the_text_across_a_gunicorn_reload(shared_server, node):
    """static/realtime.js's `texts` fed by a real EventSource (npm `eventsource`), which reconnects
    with Last-Event-ID by itself when a SIGHUP reload ends its stream mid-generation."""
    server = shared_server
    channel = f"gen.{random.randrange(10**9)}"
    token = server.token(channel, ["answer"])
    script = subprocess.Popen(
        [node, "texts.mjs", server.url, channel, token, "60000"],
        cwd=ROOT / "tests" / "node", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines: list[dict] = []
    reader = threading.Thread(target=lambda: lines.extend(json.loads(line) for line in script.stdout), daemon=True)
    reader.start()
    written = []
    try:
        with Publisher(server.database_url, text_flush_ms=5) as publisher:
            with publisher.text_stream(channel, "answer") as out:
                for n in range(300):
                    out.write(f"w{n} ")
                    written.append(f"w{n} ")
                    if n == 100:
                        wait_until(lambda: any(line["type"] == "text" for line in lines), what="node reading")
                        server.signal(signal.SIGHUP)  # new workers; the old ones end their streams
                        wait_until(lambda: sum(line["type"] == "open" for line in lines) >= 2, timeout=30,
                                   what="node's EventSource reconnected")
        assert script.wait(timeout=60) == 0, script.stderr.read()
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()
        reader.join(timeout=10)
        script.stdout.close()
        script.stderr.close()
    [final] = [line for line in lines if line["type"] == "final"]
    assert final["status"] == "completed"
    assert final["text"] == "".join(written)
    assert [line["lastEventId"] for line in lines if line["type"] == "request"][1] is not None
