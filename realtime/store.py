"""The message store: every published message, in one SQL table, in id order.

The only part of the package that speaks SQL (with schema.py, appends.py, reads.py, folding.py,
visibility.py and prune.py beside it). It returns frozen `Message` and `Page` values, never
ORM rows, so the dispatcher and the views stay database-free.

Every write declares its channels' write intents before it draws an id, so a
reader that finds a hole knows which channels to hold back (visibility.py).
"""
from __future__ import annotations

import json
import threading
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Callable, Sequence

from sqlalchemy import event, func, insert, select, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.orm import Session

from common.database import Database, database_call, utcnow

from . import metrics, queries
from .errors import IdempotencyKeyReused
from .appends import insert_batch, insert_one
from .changes import ChangeFeed, Notifier, PollingChangeFeed, PostgresChangeFeed
from .folding import fold, not_superseded, unended
from .prune import Pruner
from .reads import PAGE_BYTES, Message, NewMessage, Page, Ranges, message_from, read_page, run_page
from .schema import (
    INTENT, NOTIFY_CHANNEL, as_int4, create_schema, idempotency, intent_key, messages,
    meta, pruned,
)
from .visibility import LAST_DRAWN, NO_WRITERS, WriterProbe, Writers, backoff

__all__ = ["Message", "MessageStore", "NewMessage", "Page", "PAGE_BYTES", "Ranges"]

_INTENT = text(f"SELECT pg_advisory_xact_lock_shared({INTENT}, :key)")

class MessageStore:
    """Append-only log of messages with per-channel reads and age-based pruning."""

    def __init__(self, db: Database, *, now: Callable[[], datetime] = utcnow) -> None:
        self.db = db
        self.engine = db.engine
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self._now = now
        self._epoch: str | None = None
        self.reads = 0  # SELECTs issued by this store (tests; /metrics counts them for operators)
        self.probe = WriterProbe(self.engine)
        self.pruner = Pruner(db, now=now)  # expired messages, a batch per transaction (prune.py)
        db.add_schema(create_schema)

    @property
    def epoch(self) -> str:
        """A random tag of this database, part of every cursor (see cursor.py)."""
        if self._epoch is None:
            self._epoch = self._load_epoch()
        return self._epoch

    @database_call
    def _load_epoch(self) -> str:
        with self.engine.connect() as conn:
            return conn.execute(select(meta.c.value).where(meta.c.key == "epoch")).scalar_one()

    # -- writing ----------------------------------------------------------

    @database_call
    def append(
        self,
        channel: str,
        topic: str,
        data_json: str,
        *,
        run_id: str | None = None,
        session: Session | None = None,
        on_commit: Callable[[], None] | None = None,
        idempotency_key: str | None = None,
    ) -> Message:
        """Store one message and return it with its id; call `on_commit` once it is committed.

        With `session`, the row is written in the caller's transaction and
        exists only if the caller commits (a transactional outbox); a rollback
        leaves no trace, not even a count. Streams of this channel wait at the
        hole its id leaves until then, so keep such transactions short; other
        channels do not wait.

        With `idempotency_key`, a repeat on the same channel stores nothing
        and returns the message the first one stored, `replayed` set; the same
        key with a different topic, data or run_id raises IdempotencyKeyReused.
        """
        def committed() -> None:
            metrics.MESSAGES_PUBLISHED.inc()
            if on_commit is not None:
                on_commit()

        if session is not None:
            message = self._append(session.connection(), channel, topic, data_json, run_id, idempotency_key)
            if not message.replayed:
                _after_commit_of(session, committed)
            return message
        if self.is_postgres and idempotency_key is None:
            message = insert_one(self.engine, channel, topic, data_json, run_id, self._now())
        else:
            with self.engine.begin() as conn:
                message = self._append(conn, channel, topic, data_json, run_id, idempotency_key)
        if not message.replayed:
            committed()
        return message

    @database_call
    def append_many(
        self, items: Sequence[NewMessage], *, on_commit: Callable[[], None] | None = None
    ) -> list[Message]:
        """Store messages in one transaction, ids in list order; all or none."""
        created_at = self._now()
        if self.is_postgres:
            ids = insert_batch(self.engine, items, created_at)
        else:
            rows = [
                {"channel": m.channel, "topic": m.topic, "data": m.data_json, "run_id": m.run_id,
                 "text_stream": m.text_stream, "text_seq": m.text_seq, "created_at": created_at}
                for m in items
            ]
            with self.engine.begin() as conn:
                self._lock(conn)
                ids = conn.execute(
                    insert(messages).returning(messages.c.id, sort_by_parameter_order=True), rows
                ).scalars().all()
        metrics.MESSAGES_PUBLISHED.inc(len(items))
        if on_commit is not None:
            on_commit()
        return [
            Message(message_id, m.channel, m.topic, m.data_json, m.run_id, created_at,
                    text_stream=m.text_stream, text_seq=m.text_seq)
            for message_id, m in zip(ids, items)
        ]

    def _append(
        self, conn: Connection, channel: str, topic: str, data_json: str, run_id: str | None,
        idempotency_key: str | None,
    ) -> Message:
        created_at = self._now()
        if self.is_postgres:
            conn.execute(_INTENT, {"key": as_int4(intent_key(channel))})
        else:
            self._lock(conn)
        if idempotency_key is not None:
            if self.is_postgres:
                # Two publishes with one key queue here, so only one stores.
                conn.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(f"{channel} {idempotency_key}", 0))))
            first = conn.execute(
                select(messages).join(idempotency, idempotency.c.message_id == messages.c.id)
                .where(idempotency.c.channel == channel, idempotency.c.key == idempotency_key)
            ).first()
            if first is not None:
                stored = replace(message_from(first), replayed=True)
                if (stored.topic, stored.data, stored.run_id) != (topic, json.loads(data_json), run_id):
                    # Returning the first message would tell the caller a different one was stored.
                    raise IdempotencyKeyReused(
                        f"Idempotency-Key {idempotency_key!r} was used on this channel for a different message; "
                        "use a new key for a new message"
                    )
                return stored
        values = {"channel": channel, "topic": topic, "data": data_json, "run_id": run_id, "created_at": created_at}
        message_id = conn.execute(insert(messages).values(values).returning(messages.c.id)).scalar_one()
        if idempotency_key is not None:
            conn.execute(insert(idempotency).values(
                channel=channel, key=idempotency_key, message_id=message_id, created_at=created_at
            ))
        return Message(message_id, channel, topic, data_json, run_id, created_at)

    def prune(self, max_age: timedelta) -> int:
        """Delete messages older than `max_age` (one round of the pruner); return how many."""
        return self.pruner.run(max_age).removed

    # -- reading ----------------------------------------------------------

    @database_call
    def read_after(
        self, channel: str, topics: Sequence[str] | None, after_id: int, limit: int,
        max_bytes: int = PAGE_BYTES, through: int | None = None,
    ) -> Page:
        """Messages of `channel` (and `topics`, None = all) with id > after_id (and <= `through`),
        oldest first: at most `limit` of them, and no more than `max_bytes` of data but the first.
        `page.pruned_through` is the channel's prune mark as of the same snapshot.

        Replay's read: a text stream comes as one message with its text so far (folding.py).
        """
        query = queries.channel_page(self.is_postgres, topics is not None, through is not None)
        params = {"channel": channel, "after_id": after_id, "topics": list(topics or ()), "through": through}
        self._count_read("replay")
        return self._folded(run_page(self.engine, query, params, limit, max_bytes, marks="channel"), max_bytes)

    @database_call
    def read_after_many(
        self, ranges: Ranges, limit: int, max_bytes: int = PAGE_BYTES, through: int | None = None,
    ) -> Page:
        """`read_after` for several channels at once, each from its own start (docs/protocol.md §12):
        one SELECT for all of them, in id order. `page.pruned_through` and `page.pruned_channels`
        say which channels were pruned past their start, as of the same snapshot."""
        where = [ranges.where(), not_superseded(through)]
        if through is not None:
            where.append(messages.c.id <= through)
        self._count_read("replay")
        return self._folded(read_page(self.engine, where, limit, max_bytes, pruned_ranges=ranges), max_bytes)

    def _folded(self, page: Page, max_bytes: int) -> Page:
        """A replay page with its text streams folded (folding.py)."""
        if any(m.text_stream is not None for m in page):
            self._count_read("replay")
            page = fold(self.engine, page, max_bytes)
        return page

    @database_call
    def newer_text_starts(self, streams: Sequence[tuple[str, str, int]]) -> set[tuple[str, str]]:
        """Of these text streams, each (channel, stream id, the id of its writer's attempt's start),
        those a newer attempt of has started since: their writer outlived its attempt (text_streams.py)."""
        if not streams:
            return set()
        self._count_read("lookup")
        params = {"channels": sorted({channel for channel, _, _ in streams}), "after": min(s for _, _, s in streams)}
        with self.engine.connect() as conn:
            newer = conn.execute(queries.text_starts(self.is_postgres), params).all()
        latest: dict[tuple[str, str], int] = {}
        for channel, sid, start in newer:
            latest[channel, sid] = max(start, latest.get((channel, sid), 0))
        return {(channel, sid) for channel, sid, start in streams if latest.get((channel, sid), 0) > start}

    @database_call
    def unended_text_streams(self, run_id: str) -> Sequence[Message]:
        """The last message of each text stream of `run_id` that has no end (folding.py `unended`)."""
        self._count_read("lookup")
        return unended(self.engine, run_id)

    @database_call
    def read_new(
        self, after_id: int, limit: int, max_bytes: int = PAGE_BYTES, *, through: int | None = None,
        keys: Sequence[int] | None = None,
    ) -> Page:
        """The same for every channel (the dispatcher's read), or for the channels of these intent keys."""
        query = queries.new_rows(self.is_postgres, through is not None, keys is not None)
        params = {"after_id": after_id, "through": through, "keys": [as_int4(k) for k in keys or ()]}
        self._count_read("dispatcher")
        return run_page(self.engine, query, params, limit, max_bytes, marks=None)

    def _count_read(self, kind: str) -> None:
        """A SELECT of messages: for tests (`reads`) and for operators (/metrics, by kind)."""
        self.reads += 1
        metrics.STORE_READS.labels(kind).inc()

    # -- where readers may go (visibility.py) ------------------------------

    @database_call
    def writers(self) -> Writers:
        """The transactions that may still commit messages, as a look started now sees them
        (PostgreSQL; none on SQLite)."""
        return self.probe.snapshot() if self.is_postgres else NO_WRITERS

    @database_call
    def last_drawn(self) -> int:
        """The newest id handed out, committed or not (SQLite: the newest committed)."""
        if not self.is_postgres:
            return self._max_id()
        with self.engine.connect() as conn:
            return conn.execute(LAST_DRAWN).scalar_one()

    def settled_through(self, channel: str) -> int:
        """An id through which every message of `channel` is visible or never will be.

        The last id drawn, once the transactions in flight that may write on
        the channel have ended; transactions on other channels are not waited
        for. Bounded by the call's time limit (then DatabaseUnavailable).
        """
        return self.settled_through_all((channel,))

    @database_call
    def settled_through_all(self, channels: Sequence[str]) -> int:
        """`settled_through` for several channels: the transactions that may write any of them
        are waited for, in one wait (a read of several channels, docs/protocol.md §12)."""
        drawn = self.last_drawn()
        if not self.is_postgres:
            return drawn
        keys = [intent_key(channel) for channel in channels]
        started = self.probe.clock()
        writers = self.probe.snapshot()
        while blocking := [w for w in writers if any(map(w.may_write, keys))]:
            self.probe.waiting_on(blocking, "a history read")
            threading.Event().wait(backoff(self.probe.clock() - started))
            writers = self.probe.newer_than(writers)
        return drawn

    @database_call
    def last_id(self) -> int:
        """The newest id (committed)."""
        return self._max_id()

    def _max_id(self) -> int:
        self._count_read("lookup")
        with self.engine.connect() as conn:
            return conn.execute(select(func.max(messages.c.id))).scalar() or 0

    @database_call
    def pruned_through(self, channel: str) -> int:
        """The highest id pruned from `channel`, 0 when nothing was."""
        self._count_read("lookup")
        with self.engine.connect() as conn:
            return conn.execute(
                select(pruned.c.through_id).where(pruned.c.channel == channel)
            ).scalar() or 0

    # -- change notification ----------------------------------------------

    def change_feed(self, poll_s: float, listen_url: str | None = None) -> ChangeFeed:
        """What wakes the dispatcher when another process appends: LISTEN/NOTIFY or a poll.

        On PostgreSQL `poll_s` is the safety poll beside LISTEN, on SQLite the only wake-up.
        """
        if self.is_postgres:
            url = make_url(listen_url) if listen_url else self.engine.url
            return PostgresChangeFeed(url, NOTIFY_CHANNEL, notify_url=self.engine.url, safety_poll_s=poll_s)
        return PollingChangeFeed(poll_s)

    def notifier(self) -> Notifier | None:
        """What tells the other processes that this one appended, for a process that publishes
        but does not stream (realtime/publisher.py): a NOTIFY on PostgreSQL; on SQLite, nothing
        (the others poll)."""
        return Notifier.for_url(self.engine.url, NOTIFY_CHANNEL) if self.is_postgres else None

    # -- helpers ----------------------------------------------------------

    def _lock(self, conn: Connection) -> None:
        # SQLite: take the write lock now, so writers queue behind each other
        # instead of one failing to upgrade its read lock.
        if not conn.connection.driver_connection.in_transaction:
            conn.exec_driver_sql("BEGIN IMMEDIATE")


def _after_commit_of(session: Session, committed: Callable[[], None]) -> None:
    """Call `committed` once the session's transaction commits; never after a rollback.

    SQLAlchemy's `after_commit` fires at the session's next commit, which after a
    rollback is a later, unrelated transaction: the rollback disarms it. (A listener
    cannot be removed while its event runs, so each one only ends the other's turn.)
    """
    ended = False

    def on_commit(_session: Session) -> None:
        nonlocal ended
        if not ended:
            ended = True
            committed()

    def on_rollback(_session: Session) -> None:
        nonlocal ended
        ended = True

    event.listen(session, "after_commit", on_commit, once=True)
    event.listen(session, "after_rollback", on_rollback, once=True)
