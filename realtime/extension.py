"""`Realtime`, the Flask extension: the Python API and the glue between the parts.

    realtime = Realtime(app)            # or Realtime() then init_app(app, db=...)
    realtime.publish("run.42", "status", {"percent": 10})
    grant = realtime.create_token("run.42", ["status", "log"])

One instance per app, kept in `app.extensions["realtime"]`. It reads the
`REALTIME_*` keys once in `init_app` and passes plain values to the store,
dispatcher and token issuer, which never look at Flask.
"""
from __future__ import annotations

import logging
import math
import threading
from datetime import timedelta
from typing import Any, Callable, Iterator, Mapping, Sequence

from flask import Flask
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from common.database import Database, database_for

from . import metrics
from .admission import StreamAdmission
from .changes import PostgresChangeFeed
from .cursor import Cursor
from .dispatch import Dispatcher
from .errors import Forbidden
from .messages import check_batch, check_message, check_text_stream
from .names import check_channel, check_idempotency_key, check_topic
from .store import Message, MessageStore, Ranges
from .stream import Reset, Scope, open_scope_stream, open_stream, pruned_after, resolve_cursor, resolve_starts
from .stream_limits import StreamLimits
from .text_streams import TextFlusher, TextStream, interrupted_ends
from .tokens import Grant, TokenIssuer

log = logging.getLogger(__name__)

Policy = Callable[[str, Sequence[str]], bool]

HISTORY_BYTES = 4 * 1024 * 1024  # of message data in one GET /api/realtime/messages, but its first

DEFAULTS = {
    "REALTIME_TOKEN_TTL_S": 60,
    "REALTIME_HEARTBEAT_S": 15,
    "REALTIME_RETRY_MS": 2000,
    "REALTIME_RETENTION_S": 86400,
    "REALTIME_MAX_MESSAGE_BYTES": 524288,
    "REALTIME_PUBLISH_KEY": None,
    "REALTIME_MAX_BATCH_BYTES": 4 * 1024 * 1024,  # a POST /api/realtime/publish of {"messages": [...]}
    # Beyond docs/protocol.md §2: tuning knobs with safe defaults (README, Configuration).
    "REALTIME_LISTEN_URL": None,  # PostgreSQL: a direct connection for LISTEN (default: DATABASE_URL)
    "REALTIME_POLL_S": 0.25,  # SQLite: how often other processes' appends are looked for
    "REALTIME_SAFETY_POLL_S": 1.0,  # PostgreSQL: a look without a NOTIFY, in case LISTEN is lost
    "REALTIME_STREAM_BUFFER": 1000,  # frames queued for a slow client before its stream ends
    "REALTIME_SEND_TIMEOUT_S": 10,  # a write to a client that stopped reading is cut after this
    "REALTIME_PRUNE_INTERVAL_S": 300,
    "REALTIME_STREAM_ADMISSION": 16,  # stream requests let into the app at once per process; 0: no limit
    # Streams one process holds, open or being set up; unset: gunicorn's worker_connections less 5%
    # (gunicorn.conf.py); 0: no limit. And the streams of one token in one process; 0: no limit.
    "REALTIME_MAX_STREAMS": None,
    "REALTIME_MAX_STREAMS_PER_TOKEN": 16,
    # Text streams (text_streams.py): how often a process stores what its text streams wrote
    # (None: only when the caller calls `text_flusher.flush()`, for tests), and the most text
    # one stream may hold.
    "REALTIME_TEXT_FLUSH_MS": 50,
    "REALTIME_TEXT_MAX_BYTES": 1024 * 1024,
}


class Realtime:
    def __init__(self, app: Flask | None = None, *, db: Database | None = None) -> None:
        self._policy: Policy | None = None
        if app is not None:
            self.init_app(app, db=db)

    def init_app(self, app: Flask, *, db: Database | None = None) -> None:
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        config = app.config
        self.max_message_bytes = int(config["REALTIME_MAX_MESSAGE_BYTES"])
        self.max_batch_bytes = int(config["REALTIME_MAX_BATCH_BYTES"])
        self.heartbeat_s = float(config["REALTIME_HEARTBEAT_S"])
        self.retry_ms = int(config["REALTIME_RETRY_MS"])
        self.retention = timedelta(seconds=float(config["REALTIME_RETENTION_S"]))
        self.publish_key: str | None = config["REALTIME_PUBLISH_KEY"] or None
        # No app-wide MAX_CONTENT_LENGTH: each endpoint reads its body with its
        # own limit (views.py; docs/protocol.md §3.3).

        self.store = MessageStore(db or database_for(app))  # no SQL yet: the schema is made at first use
        poll_s = float(config["REALTIME_SAFETY_POLL_S" if self.store.is_postgres else "REALTIME_POLL_S"])
        self.dispatcher = Dispatcher(
            self.store,
            self.store.change_feed(poll_s, listen_url=config["REALTIME_LISTEN_URL"]),
            heartbeat_s=self.heartbeat_s,
            buffer_size=int(config["REALTIME_STREAM_BUFFER"]),
            send_timeout_s=float(config["REALTIME_SEND_TIMEOUT_S"]),
        )
        self.text_max_bytes = int(config["REALTIME_TEXT_MAX_BYTES"])
        self.text_flusher = TextFlusher(
            lambda items: self.store.append_many(items, on_commit=self.dispatcher.notify_appended),
            newer_starts=self.store.newer_text_starts,
            interval_s=None if config["REALTIME_TEXT_FLUSH_MS"] is None else float(config["REALTIME_TEXT_FLUSH_MS"]) / 1000,
        )
        self.tokens = TokenIssuer(config["SECRET_KEY"], ttl_s=float(config["REALTIME_TOKEN_TTL_S"]))
        self._prune_interval_s = float(config["REALTIME_PRUNE_INTERVAL_S"])
        self._pruner: threading.Thread | None = None
        self._starting = threading.Lock()
        self._stopped = threading.Event()

        max_streams = config["REALTIME_MAX_STREAMS"]
        self.stream_limits = StreamLimits(
            max_streams=None if max_streams is None else int(max_streams),
            max_per_token=int(config["REALTIME_MAX_STREAMS_PER_TOKEN"]),
            retry_after_s=max(1, math.ceil(self.heartbeat_s)),
        )

        app.extensions["realtime"] = self
        app.wsgi_app = StreamAdmission(  # type: ignore[method-assign]
            app.wsgi_app, int(config["REALTIME_STREAM_ADMISSION"]), limits=self.stream_limits
        )
        # Background work starts with the first request, i.e. in the serving
        # process after gunicorn forked, never at import or in `flask` commands.
        app.before_request(self.start)

    # -- publishing -------------------------------------------------------

    @property
    def engine(self) -> Engine:
        """The engine messages are stored with: a `session=` publish needs a Session on it."""
        return self.store.engine

    def publish(
        self,
        channel: str,
        topic: str,
        data: Any,
        *,
        run_id: str | None = None,
        session: Session | None = None,
        idempotency_key: str | None = None,
    ) -> Message:
        """Store a message and wake every stream of its channel.

        With `session`, the message is part of the caller's transaction: it
        is stored, and streamed, only if that transaction commits. With
        `idempotency_key`, a repeat on the same channel within the retention
        stores nothing and returns the first message (`replayed` set): a
        client that timed out may safely publish again.
        """
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
        new = check_message(channel, topic, data, run_id, max_bytes=self.max_message_bytes)
        return self.store.append(
            new.channel, new.topic, new.data_json, run_id=new.run_id, session=session,
            on_commit=self.dispatcher.notify_appended, idempotency_key=idempotency_key,
        )

    def publish_many(self, messages: Sequence[Mapping[str, Any]]) -> list[Message]:
        """Store 1-1000 messages in one transaction, ids in list order; all or none.

        Each is `{"channel", "topic", "data", "run_id"?}`, checked as `publish` checks one.
        """
        checked = check_batch(messages, max_bytes=self.max_message_bytes)
        return self.store.append_many(checked, on_commit=self.dispatcher.notify_appended)

    def text_stream(
        self,
        channel: str,
        topic: str,
        id: str | None = None,
        *,
        run_id: str | None = None,
        interrupt: Callable[[], None] | None = None,
        cancel_errors: tuple[type[BaseException], ...] = (),
    ) -> TextStream:
        """A text stream to write, as a context manager (text_streams.py; docs/protocol.md §11):

            with realtime.text_stream("run.42", "answer") as out:
                out.write("Hello")

        `id`: the stream's id, the same for every attempt of one piece of text (a
        random one by default). `interrupt` is called at each write and may raise
        to stop the writer; `cancel_errors` are the exceptions that end it `cancelled`.
        """
        return TextStream(
            self.text_flusher, *check_text_stream(channel, topic, id, run_id), run_id=run_id,
            max_bytes=self.text_max_bytes, interrupt=interrupt, cancel_errors=cancel_errors,
        )

    def end_interrupted_text_streams(self, run_id: str) -> int:
        """End `failed` (`interrupted`) each text stream of `run_id` whose writer died before its end;
        return how many. For a run's next attempt, before it writes again (jobs/runner.py)."""
        ends = interrupted_ends(self.store.unended_text_streams(run_id))
        if ends:
            self.store.append_many(ends, on_commit=self.dispatcher.notify_appended)
        return len(ends)

    # -- subscribing ------------------------------------------------------

    def authorize(self, policy: Policy) -> Policy:
        """Register who may get a token: `policy(channel, topics) -> bool`, called in the request.

        With no policy registered every token request is refused: exposing a
        channel is a decision the app must make.
        """
        self._policy = policy
        return policy

    def create_token(self, channel: str, topics: Sequence[str], ttl: float | None = None) -> Grant:
        return self.tokens.issue(channel, topics, ttl)

    def create_token_for(self, channels: Mapping[str, Sequence[str]], ttl: float | None = None) -> Grant:
        """A token for several channels, each with its topics: one stream carries them all (docs/protocol.md §12)."""
        return self.tokens.issue_for(channels, ttl)

    def grant_for_request(self, channel: str, topics: Sequence[str]) -> Grant:
        """A token for a client's request, if the app's policy allows it."""
        self._allow(channel, topics)
        return self.create_token(channel, topics)

    def grant_for_request_of(self, channels: Mapping[str, Sequence[str]]) -> Grant:
        """A token for several channels, if the app's policy allows each of them."""
        for channel, topics in channels.items():
            self._allow(channel, topics)
        return self.create_token_for(channels)

    def _allow(self, channel: str, topics: Sequence[str]) -> None:
        if self._policy is None or not self._policy(channel, topics):
            raise Forbidden(f"this client may not subscribe to channel {channel!r} with these topics")

    def stream(
        self, channel: str, topics: Sequence[str] | None, cursor: str | None, *, request_id: str | None = None
    ) -> Iterator[bytes]:
        """The frames of one subscriber, from `cursor` (a `Last-Event-ID`) on; never ends by itself.

        A bad name or a malformed cursor raises here, before any frame.
        """
        check_channel(channel)
        for topic in topics or ():
            check_topic(topic)
        parsed = Cursor.parse(cursor) if cursor else None
        self.dispatcher.start()  # `flask realtime tail` streams without the rest of start()
        return open_stream(self.dispatcher, channel, topics, parsed, retry_ms=self.retry_ms, request_id=request_id)

    def stream_of(
        self,
        scope: Mapping[str, Sequence[str] | None],
        cursor: str | None,
        *,
        since: Mapping[str, str | None] | None = None,
        progress: str | None = None,
        request_id: str | None = None,
    ) -> Iterator[bytes]:
        """The frames of one subscriber to several channels, each with its topics (None: all), in
        id order with one cursor (docs/protocol.md §12). `since`: channels that start from their own
        cursor (None: their oldest message) instead of `cursor`; `progress`: the Last-Event-ID of a
        reconnect that kept its `since`. A bad name or a malformed cursor raises here, before any frame."""
        for channel, topics in scope.items():
            check_channel(channel)
            for topic in topics or ():
                check_topic(topic)
        parsed = Cursor.parse(cursor) if cursor else None
        starts = None if since is None else {c: Cursor.parse(at) if at else None for c, at in since.items()}
        self.dispatcher.start()
        return open_scope_stream(
            self.dispatcher, scope, parsed, since=starts, progress=Cursor.parse(progress) if progress else None,
            retry_ms=self.retry_ms, request_id=request_id,
        )

    def history_of(
        self, scope: Mapping[str, Sequence[str] | None], after: str | None, limit: int
    ) -> tuple[list[Message], str, Reset | None]:
        """`history` for several channels: one page of all of them in id order, one cursor."""
        cursor = Cursor.parse(after) if after else None
        starts, reset = resolve_starts(self.store, 0, list(scope), cursor)
        ranges = Ranges.of(scope, starts)
        page = self.store.read_after_many(
            ranges, limit, HISTORY_BYTES, through=self.store.settled_through_all(ranges.channels)
        )
        after_id = ranges.first
        pruned = Scope(ranges).pruned(page, after_id, self.store.epoch)
        if pruned is not None:
            reset, after_id = pruned, page.pruned_through
        if cursor is not None:
            metrics.RESUMES.labels(reset.reason if reset is not None else "exact").inc()
        last_id = page[-1].id if page else after_id
        return list(page), str(Cursor(self.store.epoch, last_id)), reset

    def history(
        self, channel: str, topics: Sequence[str] | None, after: str | None, limit: int
    ) -> tuple[list[Message], str, Reset | None]:
        """Up to `limit` messages after `after`, and about HISTORY_BYTES of data at most:
        (messages, the cursor to continue from, reset or None)."""
        cursor = Cursor.parse(after) if after else None
        after_id, reset = resolve_cursor(self.store, channel, cursor)
        # Only settled messages: a page must never step over one that commits late.
        page = self.store.read_after(
            channel, topics, after_id, limit, HISTORY_BYTES, through=self.store.settled_through(channel)
        )
        if cursor is not None and reset is None:
            # Pruned between the cursor's check and the page?
            reset = pruned_after(page, after_id, self.store.epoch)
            if reset is not None:
                after_id = page.pruned_through
        if cursor is not None:
            metrics.RESUMES.labels(reset.reason if reset is not None else "exact").inc()
        last_id = page[-1].id if page else after_id
        return list(page), str(Cursor(self.store.epoch, last_id)), reset

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Start the dispatcher and the pruning schedule (idempotent)."""
        if self._pruner is not None:
            return
        with self._starting:
            if self._pruner is not None or self._stopped.is_set():
                return
            self._pruner = threading.Thread(target=self._prune_forever, name="realtime-pruner", daemon=True)
            self._pruner.start()
            self.dispatcher.start()
            self.text_flusher.start()  # here, in the hub's thread under gevent

    def prune(self) -> int:
        """Delete messages older than REALTIME_RETENTION_S now; return how many.

        Round after round while a backlog remains (prune.py), unless another
        process is pruning or this one is stopping.
        """
        removed = 0
        while True:
            pruned = self.store.pruner.run(self.retention, stop=self._stopped)
            removed += pruned.removed
            if pruned.removed or pruned.forgotten:
                log.info(
                    "pruned %d messages older than %s in %d batches%s; forgot %d channels' prune marks",
                    pruned.removed, self.retention, pruned.batches, ", more to go" if pruned.behind else "",
                    pruned.forgotten,
                )
            if not pruned.behind or self._stopped.is_set():
                return removed

    def shutdown(self, wait_s: float = 0.0) -> None:
        """End all open streams now, so clients resume on another process (gunicorn.conf.py).

        `wait_s`: how long to wait for the reader and the pruner to let go of the database.
        """
        self._stopped.set()
        self.dispatcher.stop(wait_s)
        with self._starting:
            pruner = self._pruner
        if wait_s > 0 and pruner is not None:
            pruner.join(timeout=wait_s)

    def change_feed_problem(self) -> str | None:
        """For /readyz: None when other processes' messages reach this one as they should."""
        if self._stopped.is_set():
            return "stopped"
        if isinstance(self.dispatcher.feed, PostgresChangeFeed) and not self.dispatcher.feed.listening:
            return "the LISTEN connection is down; reconnecting (messages still arrive by the safety poll)"
        return None

    def _prune_forever(self) -> None:
        # Every process keeps this schedule; a round finding another at work ends at once (prune.py).
        while not self._stopped.wait(self._prune_interval_s):
            try:
                self.prune()
            except Exception:
                log.exception("pruning failed; will retry")
