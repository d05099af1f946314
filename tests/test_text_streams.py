"""Text streams (realtime/text_streams.py, folding.py; docs/protocol.md §11), on SQLite and PostgreSQL.

The flusher runs manually here (REALTIME_TEXT_FLUSH_MS=None): each test says
when a flush happens, so what a flush stores is exact, with no thread and no sleep.
"""
from __future__ import annotations

import json
import random

import pytest
from sqlalchemy import inspect, text

from common.database import DatabaseUnavailable, make_engine
from conftest import app_on
from realtime import metrics
from realtime.errors import InvalidRequest
from realtime.text_streams import TextFlusher, TextStreamClosed, TextTooLong

CHANNEL = "run.text"


@pytest.fixture
def app(database_url):
    yield from app_on(database_url, REALTIME_TEXT_FLUSH_MS=None, REALTIME_TEXT_MAX_BYTES=1000)


@pytest.fixture
def realtime(app):
    return app.extensions["realtime"]


def flush(realtime) -> int:
    return realtime.text_flusher.flush()


def live(realtime, after: int = 0):
    """Every stored message after `after`, as a live stream gets them (the dispatcher's read)."""
    return list(realtime.store.read_new(after, 10_000))


def replay(realtime, after: int = 0, *, limit: int = 500, topics=None):
    """What a stream opened with cursor `after` replays: every page, as the stream reads them."""
    got = []
    through = realtime.store.last_id()
    while True:
        page = realtime.store.read_after(CHANNEL, topics, after, limit, through=through)
        got.extend(page)
        if not page.more:
            return got
        after = page[-1].id


def seen(realtime, sid: str) -> tuple[dict, dict]:
    """Text stream `sid` as a live client shows it (every message applied) and as a replay folds it."""
    client = Client()
    for message in live(realtime):
        client.apply(message)
    [folded] = replay(realtime)
    return client.texts[sid], folded.data


class Client:
    """The one client rule of §11, as realtime.js applies it."""

    def __init__(self) -> None:
        self.texts: dict[str, dict] = {}
        self.others: list[int] = []

    def apply(self, message) -> None:
        data = message.data
        if not (isinstance(data, dict) and "text_stream" in data):
            self.others.append(message.id)
            return
        state = self.texts.setdefault(data["text_stream"], {"text": "", "seq": 0, "status": "streaming"})
        if "text" in data:
            state.update(text=data["text"], seq=data["seq"], status=data.get("status", "streaming"))
        elif data["seq"] == state["seq"] + 1:
            state.update(text=state["text"] + data["delta"], seq=data["seq"], status=data.get("status", state["status"]))


def test_deltas_go_live_and_a_replay_folds_them_into_the_text(realtime):
    with realtime.text_stream(CHANNEL, "answer", "s1", run_id="r1") as out:
        flush(realtime)
        out.write("Hel")
        out.write("lo")
        flush(realtime)
        out.write(", world")
        flush(realtime)
    datas = [m.data for m in live(realtime)]
    assert datas == [
        {"text_stream": "s1", "seq": 0, "text": ""},
        {"text_stream": "s1", "seq": 1, "delta": "Hello"},  # one delta per stream per flush
        {"text_stream": "s1", "seq": 2, "delta": ", world"},
        {"text_stream": "s1", "seq": 3, "delta": "", "status": "completed"},
    ]
    [folded] = replay(realtime)
    assert folded.data == {"text_stream": "s1", "seq": 3, "text": "Hello, world", "status": "completed"}
    assert folded.id == live(realtime)[-1].id  # the cursor of the last message it covers
    assert folded.run_id == "r1" and folded.topic == "answer"
    # History (GET /api/realtime/messages) folds the same way.
    messages, _cursor, _reset = realtime.history(CHANNEL, None, None, 100)
    assert [m.data for m in messages] == [folded.data]


def test_resuming_from_any_cursor_gives_the_written_text_and_every_other_message_once(realtime):
    rng = random.Random(7)
    written = []
    with realtime.text_stream(CHANNEL, "answer", "gen") as out:
        for step in range(40):
            for _ in range(rng.randint(0, 4)):
                piece = rng.choice(["lo", "rem", " ip", "sum", "é", "漢", "\n", '"q"'])
                out.write(piece)
                written.append(piece)
            if rng.random() < 0.3:
                realtime.publish(CHANNEL, "status", {"step": step})
            flush(realtime)
    everything = live(realtime)
    others = [m.id for m in everything if m.text_stream is None]
    for cut in [0] + [m.id for m in everything]:
        client = Client()
        for message in everything:
            if message.id <= cut:
                client.apply(message)  # what the client had when it disconnected
        before = list(client.others)
        for message in replay(realtime, cut, limit=rng.choice([1, 2, 5, 500])):
            client.apply(message)
        assert client.texts["gen"] == {"text": "".join(written), "seq": everything[-1].text_seq, "status": "completed"}
        assert client.others == before + [i for i in others if i > cut]  # no gap, no repeat


def test_a_replay_page_counts_a_text_stream_once_and_stops_at_its_byte_budget(realtime):
    for sid in ("a", "b", "c"):
        with realtime.text_stream(CHANNEL, "answer", sid) as out:
            for _ in range(10):
                out.write(sid * 90)
                flush(realtime)
    page = realtime.store.read_after(CHANNEL, None, 0, 2)
    assert [m.data["text_stream"] for m in page] == ["a", "b"] and page.more
    small = realtime.store.read_after(CHANNEL, None, 0, 500, max_bytes=1000)
    assert [m.data["text"] for m in small] == ["a" * 900]  # the first always; then the budget is spent
    assert small.more


def test_a_retried_attempt_restarts_at_seq_0_and_only_it_is_shown(realtime):
    with pytest.raises(RuntimeError):
        with realtime.text_stream(CHANNEL, "answer", "same") as out:
            out.write("first attempt")
            flush(realtime)
            raise RuntimeError("the model timed out")
    with realtime.text_stream(CHANNEL, "answer", "same") as out:
        out.write("second")
        flush(realtime)
    assert seen(realtime, "same") == (
        {"text": "second", "seq": 2, "status": "completed"},
        {"text_stream": "same", "seq": 2, "text": "second", "status": "completed"},
    )
    failed_end = [m.data for m in live(realtime) if m.data.get("status") == "failed"]
    assert failed_end == [{"text_stream": "same", "seq": 2, "delta": "", "status": "failed", "error": "RuntimeError"}]


def test_a_stale_writers_late_delta_after_the_next_attempt_folds_as_the_client_shows_it(realtime):
    """A writer cut off from the database (its run's lease lapsed and another worker retried the
    step) stores its queued text once it is back, after the new attempt's start. The client
    ignores a delta whose seq is not the next one, and a replay's fold must agree: not append
    it, nor take the stale end for the running attempt's."""
    from realtime.text_streams import TextStream

    stale = TextFlusher(realtime.store.append_many, interval_s=None)
    old = TextStream(stale, CHANNEL, "answer", "same").__enter__()
    for piece in ("one ", "two ", "three "):
        old.write(piece)
        stale.flush()  # seqs 0-3, one delta per flush
    old.write("four ")  # queued: the database is away for this writer
    with realtime.text_stream(CHANNEL, "answer", "same") as out:  # the retry, on another worker
        out.write("new")
        flush(realtime)  # seqs 0, 1
        stale.flush()  # the old writer is back: its late delta, seq 4
        out.write(" attempt")
        flush(realtime)  # seq 2
        assert seen(realtime, "same") == (
            {"text": "new attempt", "seq": 2, "status": "streaming"},
            {"text_stream": "same", "seq": 2, "text": "new attempt"},
        )
    assert seen(realtime, "same") == (
        {"text": "new attempt", "seq": 3, "status": "completed"},
        {"text_stream": "same", "seq": 3, "text": "new attempt", "status": "completed"},
    )
    old.__exit__(None, None, None)


def test_a_writer_that_outlived_its_attempt_stores_nothing_after_the_newer_start(realtime):
    """The same writer cut off from the database, its queued delta's seq exactly the one the new
    attempt's client expects next (the case the client rule cannot tell apart): the flusher
    finds the newer start and stores nothing more of the old writer, whose next write raises."""
    from realtime.text_streams import TextStream, TextStreamSuperseded

    stale = TextFlusher(realtime.store.append_many, newer_starts=realtime.store.newer_text_starts, interval_s=None)
    old = TextStream(stale, CHANNEL, "answer", "same").__enter__()
    old.write("one ")
    stale.flush()  # seqs 0, 1
    old.write("two ")  # queued: would be seq 2
    with realtime.text_stream(CHANNEL, "answer", "same") as out:  # the retry, on another worker
        out.write("new")
        flush(realtime)  # seqs 0, 1: the old writer's seq 2 would follow
        before = realtime.store.last_id()
        assert stale.flush() == 0
        assert realtime.store.last_id() == before
        with pytest.raises(TextStreamSuperseded):
            old.write("three ")
        old.__exit__(TextStreamSuperseded, TextStreamSuperseded("x"), None)  # returns at once, stores no end
        assert realtime.store.last_id() == before
        out.write(" attempt")
    assert seen(realtime, "same") == (
        {"text": "new attempt", "seq": 3, "status": "completed"},
        {"text_stream": "same", "seq": 3, "text": "new attempt", "status": "completed"},
    )


def test_a_newer_attempt_of_one_stream_leaves_the_others_of_the_flush_alone(realtime):
    from realtime.text_streams import TextStream

    stale = TextFlusher(realtime.store.append_many, newer_starts=realtime.store.newer_text_starts, interval_s=None)
    streams = {sid: TextStream(stale, CHANNEL, "answer", sid).__enter__() for sid in ("a", "b", "c")}
    stale.flush()
    with realtime.text_stream(CHANNEL, "answer", "b") as out:
        out.write("B again")
    for sid, stream in streams.items():
        stream.write(sid * 3)
    stale.flush()
    for stream in streams.values():
        stream.__exit__(None, None, None)
    client = Client()
    for message in live(realtime):
        client.apply(message)
    assert {sid: state["text"] for sid, state in client.texts.items()} == {"a": "aaa", "b": "B again", "c": "ccc"}


class Stop(Exception):
    pass


def test_how_a_stream_ends(realtime):
    with pytest.raises(Stop):
        with realtime.text_stream(CHANNEL, "answer", "cancelled", cancel_errors=(Stop,)) as out:
            out.write("kept")
            raise Stop()
    with pytest.raises(TextTooLong):
        with realtime.text_stream(CHANNEL, "answer", "long") as out:
            out.write("x" * 600)
            out.write("é" * 250)  # 500 bytes: past REALTIME_TEXT_MAX_BYTES=1000
    folded = {m.data["text_stream"]: m.data for m in replay(realtime)}
    assert folded["cancelled"] == {"text_stream": "cancelled", "seq": 2, "text": "kept", "status": "cancelled"}
    assert folded["long"] == {"text_stream": "long", "seq": 2, "text": "x" * 600, "status": "failed", "error": "TextTooLong"}
    with pytest.raises(TextStreamClosed):
        out.write("more")


def test_what_write_refuses(realtime):
    stream = realtime.text_stream(CHANNEL, "answer")
    with pytest.raises(TextStreamClosed):
        stream.write("not opened yet")
    with stream as out:
        for bad in (b"bytes", None, 42, "\ud800"):
            with pytest.raises((TypeError, ValueError)):
                out.write(bad)
    for channel, topic, sid in [("bad channel", "t", None), (CHANNEL, "", None), (CHANNEL, "t", ""), (CHANNEL, "t", "x" * 201)]:
        with pytest.raises((InvalidRequest, ValueError)):
            realtime.text_stream(channel, topic, sid)


def test_one_insert_stores_every_stream_of_the_process(realtime):
    streams = [realtime.text_stream(CHANNEL, "answer", f"s{i}").__enter__() for i in range(50)]
    flush(realtime)
    for stream in streams:
        stream.write("token ")
    flushes = metrics.TEXT_FLUSHES._value.get()
    assert flush(realtime) == 50
    assert metrics.TEXT_FLUSHES._value.get() == flushes + 1
    for stream in streams:
        stream.__exit__(None, None, None)


def test_a_failed_flush_keeps_its_pieces_and_a_stored_repeat_is_folded_once(realtime):
    calls = []

    def append_many(items):
        calls.append(len(items))
        if len(calls) == 2:
            raise DatabaseUnavailable("the database is away")
        stored = realtime.store.append_many(items)
        if len(calls) == 3:
            raise DatabaseUnavailable("committed, but the answer was lost")
        return stored

    flusher = TextFlusher(append_many, interval_s=None)
    from realtime.text_streams import TextStream

    with TextStream(flusher, CHANNEL, "answer", "blips") as out:
        flusher.flush()  # 1: the start
        out.write("a")
        flusher.flush()  # 2: fails, nothing stored
        out.write("b")
        flusher.flush()  # 3: stores "a" (seq 1) and "b" (seq 2), but is told it failed
        out.write("c")
    # The end's flush (4) stores seqs 1 and 2 again, then "c" and the end.
    stored = [m.data for m in live(realtime)]
    assert [d["seq"] for d in stored] == [0, 1, 2, 1, 2, 3, 4]
    assert seen(realtime, "blips") == (
        {"text": "abc", "seq": 4, "status": "completed"},
        {"text_stream": "blips", "seq": 4, "text": "abc", "status": "completed"},
    )


def test_a_writer_that_died_leaves_a_stream_its_run_ends_as_interrupted(realtime):
    dead = realtime.text_stream(CHANNEL, "answer", "dead", run_id="run1").__enter__()
    dead.write("half an ans")
    flush(realtime)
    realtime.text_flusher._streams.clear()  # the process is gone: nothing more of it is stored
    with realtime.text_stream(CHANNEL, "answer", "done", run_id="run1"):
        pass
    assert realtime.end_interrupted_text_streams("run1") == 1
    assert realtime.end_interrupted_text_streams("run1") == 0
    folded = {m.data["text_stream"]: m.data for m in replay(realtime)}
    assert folded["dead"] == {"text_stream": "dead", "seq": 2, "text": "half an ans", "status": "failed", "error": "interrupted"}


def test_text_streams_of_other_channels_never_mix(realtime):
    for channel in (CHANNEL, "run.other"):
        with realtime.text_stream(channel, "answer", "same-id") as out:
            out.write(channel)
            flush(realtime)
    [folded] = replay(realtime)
    assert folded.data["text"] == CHANNEL


def test_a_database_made_before_text_streams_gets_their_columns(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.sqlite3'}"
    engine = make_engine(url)
    with engine.begin() as conn:  # the table as versions before issue 20 made it
        conn.execute(text(
            "CREATE TABLE realtime_messages (id INTEGER PRIMARY KEY AUTOINCREMENT, channel VARCHAR(200) NOT NULL, "
            "topic VARCHAR(100) NOT NULL, data TEXT NOT NULL, run_id VARCHAR(64), created_at DATETIME NOT NULL)"
        ))
        conn.execute(text(
            "INSERT INTO realtime_messages (channel, topic, data, created_at) VALUES ('run.text', 't', '{\"old\": 1}', '2026-01-01')"
        ))
    engine.dispose()
    for app in app_on(url, REALTIME_TEXT_FLUSH_MS=None):
        realtime = app.extensions["realtime"]
        columns = {c["name"] for c in inspect(realtime.store.engine).get_columns("realtime_messages")}
        assert {"text_stream", "text_seq"} <= columns
        with realtime.text_stream(CHANNEL, "answer", "new") as out:
            out.write("works")
        assert [json.loads(m.data_json) for m in replay(realtime)][0] == {"old": 1}
        assert replay(realtime)[1].data["text"] == "works"
