"""Text streams: text that grows while a job writes it, e.g. an LLM's answer (docs/protocol.md §11).

    with realtime.text_stream("run.42", "answer") as out:
        for piece in llm_answer():
            out.write(piece)          # returns at once: no database on this path

A text stream travels as ordinary messages of one channel and topic (ids,
cursors, tokens and exactly-once resume as for any message), with `data`:

    {"text_stream": sid, "seq": 0, "text": ""}                 each attempt's start
    {"text_stream": sid, "seq": n, "delta": "..."}             n = 1, 2, 3 ...
    {"text_stream": sid, "seq": n, "delta": "", "status": "completed" | "failed" | "cancelled",
     "error"?: "<type>"}                                       the end, the next seq

Why a flusher: a generation writes 30-80 tokens a second, and one INSERT per
token for 1,000 generations is 50,000 transactions a second. So `write` only
appends to the stream's queue in memory, and one `TextFlusher` per process
stores what every one of its streams queued since the last time, every
`REALTIME_TEXT_FLUSH_MS`: one delta per stream, all in one INSERT. A reader
folds a stream's deltas back into its text on replay (folding.py).

Threads: `write` may be called from a job's native thread while the flusher is
a greenlet of the gevent hub (jobs/worker.py says why jobs run on native
threads). They share only a `deque` (append and popleft are atomic) and, for
the end, a native lock the flusher releases once the end is stored; no gevent
object is waited on across threads.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from common import jsontext
from common.database import DatabaseUnavailable
from common.greenlets import gevent_hub, native_lock, native_thread_ident, set_event, wait_native_lock

from . import metrics
from .reads import Message, NewMessage

log = logging.getLogger(__name__)

COMPLETED, FAILED, CANCELLED = "completed", "failed", "cancelled"
#: A flush of one stream stores its queued text in deltas of at most this many characters
#: (at most 4 bytes each in UTF-8: far under REALTIME_MAX_MESSAGE_BYTES).
DELTA_CHARS = 16 * 1024
#: Rows in one INSERT of the flusher; more streams than this take more than one transaction.
FLUSH_ROWS = 1000
#: A flush asks whether a newer attempt of a stream started at most this often per stream (seconds).
#: A writer that outlived its attempt was cut off or stalled for longer (a lease), so its first
#: flush after that always asks; the limit only spares a question per flush in steady writing.
NEWER_START_CHECK_S = 0.2


class TextTooLong(ValueError):
    """A write would take the stream past its size limit (REALTIME_TEXT_MAX_BYTES); the stream ends failed.

    The writer's errors are Python's own: a text stream is written by code, never by an HTTP request.
    """


class TextStreamClosed(RuntimeError):
    """A write to a text stream that is not open (not entered yet, or ended)."""


class TextStreamSuperseded(TextStreamClosed):
    """A newer attempt of the stream (same channel and id) started: this writer outlived its attempt.

    E.g. a job's step that lost its lease while cut off from the database, and was retried
    by another worker. Nothing this writer writes is stored any more (the flusher found the
    newer start), so its text never mixes into the attempt that is running.
    """


@dataclass(frozen=True)
class _Start:
    """The start of an attempt: `{"seq": 0, "text": ""}`."""


@dataclass(frozen=True)
class _End:
    status: str
    error: str | None


class TextStream:
    """One text stream being written. Make it with `Realtime.text_stream` (or `Publisher.text_stream`,
    `ctx.text_stream` in a job) and use it as a context manager: leaving the block normally ends it
    `completed`, by one of `cancel_errors` `cancelled`, by any other exception `failed`."""

    def __init__(
        self,
        flusher: TextFlusher,
        channel: str,
        topic: str,
        sid: str | None = None,
        *,
        run_id: str | None = None,
        max_bytes: int = 1024 * 1024,
        interrupt: Callable[[], None] | None = None,
        cancel_errors: tuple[type[BaseException], ...] = (),
    ) -> None:
        self.id = sid or uuid.uuid4().hex
        self.channel, self.topic, self.run_id = channel, topic, run_id
        self.max_bytes = max_bytes
        self._flusher = flusher
        self._interrupt = interrupt  # called at each write; raises to stop the writer (a cancelled run)
        self._cancel_errors = cancel_errors
        self._queue: deque[str | _Start | _End] = deque()  # the writer appends, the flusher pops
        self._size = 0  # bytes of text written in this attempt
        self._state = "new"  # new -> open -> ended (the writer's view)
        # The flusher's side: the last seq it numbered, what it numbered but could not store yet,
        # and the id of this attempt's stored start (None until stored).
        self._seq = 0
        self._unsent: list[NewMessage] = []
        self._start_id: int | None = None
        self._checked_at = float("-inf")  # when a flush last asked whether a newer attempt started
        self._superseded = False  # set by the flusher: a newer attempt started (TextStreamSuperseded)
        self._end_stored = native_lock()  # released by the flusher once the end is stored
        self._end_stored.acquire()

    @property
    def text_bytes(self) -> int:
        """Bytes of text written so far in this attempt."""
        return self._size

    def write(self, piece: str) -> None:
        """Append `piece` to the text; returns at once (stored by the next flush)."""
        if self._superseded:
            raise TextStreamSuperseded(f"a newer attempt of text stream {self.id!r} started; this one stores nothing more")
        if self._state != "open":
            raise TextStreamClosed(f"text stream {self.id!r} is {'not open' if self._state == 'new' else 'ended'}")
        if self._interrupt is not None:
            self._interrupt()
        if not isinstance(piece, str):
            raise TypeError(f"a text stream takes str pieces, not {type(piece).__name__}")
        try:
            size = len(piece.encode())
        except UnicodeEncodeError:
            raise ValueError("the text is not valid Unicode (a lone surrogate?)") from None
        if self._size + size > self.max_bytes:
            raise TextTooLong(
                f"text stream {self.id!r} would pass its limit of {self.max_bytes} bytes (REALTIME_TEXT_MAX_BYTES)"
            )
        if piece:
            self._size += size
            self._queue.append(piece)

    def __enter__(self) -> TextStream:
        if self._state != "new":
            raise TextStreamClosed(f"text stream {self.id!r} was already opened")
        self._state = "open"
        self._queue.append(_Start())
        self._flusher.add(self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            self.end(COMPLETED)
        elif isinstance(exc, self._cancel_errors):
            self.end(CANCELLED)
        else:
            self.end(FAILED, type(exc).__name__)  # the type only: a message may hold secrets

    def end(self, status: str, error: str | None = None) -> None:
        """Store what is queued and the end; return once they are stored.

        Raises DatabaseUnavailable when they could not be stored within the
        flusher's `end_timeout_s`: they stay queued and are stored once the database is back.
        """
        if self._state == "ended":
            return
        self._state = "ended"
        self._queue.append(_End(status, error))
        self._flusher.wake()
        # A manual flusher (no thread) stored it in `wake` or failed to: nothing to wait for.
        if not wait_native_lock(self._end_stored, 0 if self._flusher.interval_s is None else self._flusher.end_timeout_s):
            raise DatabaseUnavailable(
                f"the end of text stream {self.id!r} was not stored within {self._flusher.end_timeout_s:g} s; "
                "it will be once the database answers"
            )

    # -- the flusher's side ---------------------------------------------------

    def _take(self) -> tuple[list[NewMessage], bool]:
        """Number what was queued since the last flush: (the messages to store, whether the end is among them).

        Messages a failed flush numbered come first, unchanged: their seqs are taken.
        """
        messages = self._unsent
        text: list[str] = []
        ended = False
        while self._queue:
            item = self._queue.popleft()
            if isinstance(item, str):
                text.append(item)
                continue
            self._deltas("".join(text), messages)
            text = []
            if isinstance(item, _Start):
                self._seq = 0
                messages.append(self._message({"seq": 0, "text": ""}))
            else:
                self._seq += 1
                end: dict[str, Any] = {"seq": self._seq, "delta": "", "status": item.status}
                if item.error is not None:
                    end["error"] = item.error
                messages.append(self._message(end))
                ended = True
        self._deltas("".join(text), messages)
        self._unsent = messages
        return messages, ended

    def _deltas(self, text: str, into: list[NewMessage]) -> None:
        for start in range(0, len(text), DELTA_CHARS):
            self._seq += 1
            into.append(self._message({"seq": self._seq, "delta": text[start:start + DELTA_CHARS]}))

    def _message(self, fields: dict[str, Any]) -> NewMessage:
        data = {"text_stream": self.id, **fields}
        return NewMessage(
            self.channel, self.topic, jsontext.encode(data), self.run_id, text_stream=self.id, text_seq=data["seq"]
        )


class TextFlusher:
    """Stores the queued pieces of every open text stream of a process, one INSERT every `interval_s`.

    One per process and store (`Realtime` and `Publisher` each make theirs).
    It runs in a thread of its own (a greenlet under gevent), started by the
    first stream; `close()` stores what is left.
    """

    #: How long `TextStream.end` waits for its end to be stored before it raises DatabaseUnavailable.
    end_timeout_s = 10.0

    def __init__(
        self,
        append_many: Callable[[Sequence[NewMessage]], list[Message]],
        *,
        newer_starts: Callable[[Sequence[tuple[str, str, int]]], set[tuple[str, str]]] = lambda streams: set(),
        interval_s: float | None = 0.05,
    ) -> None:
        """`append_many` stores messages (`MessageStore.append_many`); `newer_starts` tells which
        streams a newer attempt of has started (`MessageStore.newer_text_starts`). `interval_s`
        None: no thread; `flush()` stores, called by the caller (and by each end), as eager mode
        runs jobs inline: tests then see every flush."""
        self._append_many = append_many
        self._newer_starts = newer_starts
        self.interval_s = interval_s
        self._streams: dict[int, TextStream] = {}  # open streams, by id(); only the flusher removes
        self._hub = gevent_hub()  # made where the app is made: the hub the flusher greenlet belongs to
        self._wake = threading.Event()
        self._start_lock = native_lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failing_since: float | None = None

    def add(self, stream: TextStream) -> None:
        self._streams[id(stream)] = stream  # a dict's item assignment is atomic
        metrics.TEXT_STREAMS_OPEN.inc()
        self.start()
        if self.interval_s is not None:
            self.wake()  # a tick from now on (an idle flusher waits for no time)

    def wake(self) -> None:
        """Flush now rather than at the next tick (an end is waiting). Safe from any thread."""
        if self.interval_s is None:
            self.flush()
        else:
            set_event(self._wake, self._hub)

    def start(self) -> None:
        """Start the flusher thread once (idempotent). Under gevent, in the hub it was made with."""
        with self._start_lock:
            if self._thread is not None or self._closed or self.interval_s is None:
                return
            self._thread = threading.Thread(target=self._run, name="realtime-text-flusher", daemon=True)
            if self._hub is not None and self._hub.thread_ident != native_thread_ident():
                # A job's native thread opened the first stream: a greenlet started here would
                # belong to that thread's hub, which runs only while the thread waits.
                self._hub.loop.run_callback_threadsafe(self._thread.start)
            else:
                self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            # A tick while streams are open; none while all are idle. An end wakes it at once.
            self._wake.wait(self.interval_s if self._streams else None)
            self._wake.clear()
            self.flush()

    def flush(self) -> int:
        """Store what every stream queued; return how many messages. Only the flusher thread calls
        this (and `close`, after it stopped): each stream's seqs are stored in order, one flush at a time."""
        batches: list[tuple[TextStream, list[NewMessage], bool]] = []
        for stream in list(self._streams.values()):
            messages, ended = stream._take()
            if messages:
                batches.append((stream, messages, ended))
        stored = 0
        chunk: list[tuple[TextStream, list[NewMessage], bool]] = []
        rows = 0
        for batch in batches:  # a stream's messages stay in one transaction, in order
            if chunk and rows + len(batch[1]) > FLUSH_ROWS:
                stored += self._store(chunk)
                chunk, rows = [], 0
            chunk.append(batch)
            rows += len(batch[1])
        if chunk:
            stored += self._store(chunk)
        return stored

    def _store(self, chunk: list[tuple[TextStream, list[NewMessage], bool]]) -> int:
        try:
            # A stream whose writer outlived its attempt stores nothing more. Asked before the
            # INSERT, not in it: a newer start committed between the two (a millisecond) is not
            # seen, and its client then ignores the stale deltas unless a seq happens to follow.
            now = time.monotonic()
            asked = [s for s, _, _ in chunk if s._start_id is not None and now - s._checked_at >= NEWER_START_CHECK_S]
            newer = self._newer_starts([(s.channel, s.id, s._start_id) for s in asked]) if asked else set()
            for stream in asked:
                stream._checked_at = now
            if newer:
                chunk = self._drop_superseded(chunk, newer)
            stored = self._append_many([message for _, messages, _ in chunk for message in messages]) if chunk else []
        except Exception as exc:
            # Kept, numbered, for the next flush: nothing written is lost, and a row stored by a
            # commit whose answer was lost comes again with the same seq, which readers ignore.
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.warning("text streams: storing %d streams' text failed (%s); retrying every flush",
                            len(chunk), type(exc).__name__, exc_info=not isinstance(exc, DatabaseUnavailable))
            return 0
        if self._failing_since is not None:
            log.info("text streams: storing again after %.1f s", time.monotonic() - self._failing_since)
            self._failing_since = None
        metrics.TEXT_FLUSHES.inc()
        position = 0
        for stream, messages, ended in chunk:
            stream._unsent = []
            for message in stored[position:position + len(messages)]:  # in list order
                if message.text_seq == 0:
                    stream._start_id = message.id
            position += len(messages)
            if ended:
                self._forget(stream)
        return position

    def _drop_superseded(
        self, chunk: list[tuple[TextStream, list[NewMessage], bool]], newer: set[tuple[str, str]]
    ) -> list[tuple[TextStream, list[NewMessage], bool]]:
        kept = []
        for batch in chunk:
            stream = batch[0]
            if (stream.channel, stream.id) not in newer:
                kept.append(batch)
                continue
            log.warning("text streams: a newer attempt of stream %r started; its earlier writer stores nothing more",
                        stream.id)
            stream._superseded = True
            stream._unsent = []
            self._forget(stream)
        return kept

    def _forget(self, stream: TextStream) -> None:
        """The stream stores nothing more: ended and stored, or superseded. Its `end` returns."""
        self._streams.pop(id(stream), None)
        metrics.TEXT_STREAMS_OPEN.dec()
        stream._end_stored.release()

    def close(self) -> None:
        """Stop the thread and store what is queued (a process that exits keeps what was written)."""
        self._closed = True
        self.wake()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.end_timeout_s)
        self.flush()



def interrupted_ends(unended: Sequence[Message]) -> list[NewMessage]:
    """The ends of text streams whose writer died mid-generation (their last stored messages):
    `failed`, error `interrupted`, so no page shows them streaming forever."""
    ends = []
    for last in unended:
        seq = last.text_seq or 0
        data = {"text_stream": last.text_stream, "seq": seq + 1, "delta": "", "status": FAILED, "error": "interrupted"}
        ends.append(NewMessage(
            last.channel, last.topic, jsontext.encode(data), last.run_id, text_stream=last.text_stream, text_seq=seq + 1
        ))
    return ends
