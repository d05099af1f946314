"""The message store: every published message, in one SQL table, in id order.

The only module of the package that speaks SQL. It returns frozen `Message`
values, never ORM rows, so the dispatcher and the views stay database-free.

What the readers rely on: **a reader never moves past an id that may still
commit.** Then "give me what comes after cursor N" never skips a late commit.

- SQLite has one writer at a time, and `AUTOINCREMENT` never reuses an id
  (not even the id of a deleted last row), so ids commit in order.
- PostgreSQL hands out sequence values without waiting for commits: with two
  concurrent writers, id 11 can commit before id 10. Writers do not queue for
  that (a lock held until commit would make commits run one at a time, and
  PostgreSQL could no longer flush several with one disk write). Instead the
  readers wait: an INSERT takes its write lock on the table when the statement
  is parsed, before it draws its id, and keeps it until its transaction ends,
  so every writer that may still commit an id shows in `pg_locks`. A reader
  that finds a hole below a committed id asks `pg_locks` which transactions
  hold that lock, waits for them to end, and then knows the hole is settled:
  filled, or rolled back for good (`writers_in_flight`, `settled_id`;
  dispatch.py holds live delivery there).
"""
from __future__ import annotations

import json
import secrets
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator, Sequence

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    case,
    cast,
    event,
    func,
    bindparam,
    insert,
    select,
    text,
)
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.orm import Session

from common.database import Database, as_utc, database_call, upsert, utcnow

from . import metrics
from .changes import ChangeFeed, Notifier, PostgresChangeFeed, PollingChangeFeed

metadata = MetaData()

# BIGINT on PostgreSQL; on SQLite it must be exactly INTEGER to be the rowid
# alias that AUTOINCREMENT applies to.
_Id = BigInteger().with_variant(Integer(), "sqlite")

messages = Table(
    "realtime_messages",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("channel", String(200), nullable=False),
    Column("topic", String(100), nullable=False),
    Column("data", Text, nullable=False),  # the JSON text, sent as is
    Column("run_id", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_realtime_messages_channel_id", "channel", "id"),
    Index("ix_realtime_messages_created_at", "created_at"),
    sqlite_autoincrement=True,
)

# The highest id pruned from each channel: a cursor below it has lost history.
pruned = Table(
    "realtime_pruned",
    metadata,
    Column("channel", String(200), primary_key=True),
    Column("through_id", _Id, nullable=False),
)

# Idempotency-Key -> the message its first publish stored, kept as long as messages are.
idempotency = Table(
    "realtime_idempotency",
    metadata,
    Column("channel", String(200), primary_key=True),
    Column("key", String(200), primary_key=True),
    Column("message_id", _Id, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_realtime_idempotency_created_at", "created_at"),
)

meta = Table(
    "realtime_meta",
    metadata,
    Column("key", String(50), primary_key=True),
    Column("value", String(200), nullable=False),
)

# An arbitrary constant naming this package's schema lock on PostgreSQL.
_SCHEMA_LOCK = 0x5EA1_0002
NOTIFY_CHANNEL = "realtime_messages"
PAGE_BYTES = 4 * 1024 * 1024  # the most message data one read returns, but for its first message

# The transactions (by virtual id: one exists before any write) that hold a
# write lock on the messages table: an INSERT takes it before it draws an id.
_INSERT_SQL = (
    "INSERT INTO realtime_messages (channel, topic, data, run_id, created_at) VALUES (%s, %s, %s, %s, %s) RETURNING id"
)
# A batch in one statement: the rows come out of unnest in list order (ORDER BY n),
# and each draws its id from the sequence as it is inserted, so ids ascend in list order.
_INSERT_MANY_SQL = (
    "INSERT INTO realtime_messages (channel, topic, data, run_id, created_at)"
    " SELECT c, t, d, r, %s FROM unnest(%b::varchar[], %b::varchar[], %b::text[], %b::varchar[])"
    " WITH ORDINALITY AS m(c, t, d, r, n) ORDER BY n RETURNING id"
)
_WRITERS = text(
    "SELECT DISTINCT virtualtransaction FROM pg_locks WHERE locktype = 'relation'"
    " AND relation = 'realtime_messages'::regclass AND mode = 'RowExclusiveLock' AND pid <> pg_backend_pid()"
)
_STILL_RUNNING = text(
    "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'virtualxid' AND virtualxid = ANY(:writers)"
)
_LAST_DRAWN = text(
    "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM realtime_messages_id_seq"
)


@dataclass(frozen=True)
class NewMessage:
    """A message to store: its data already JSON text (Realtime.publish_many checks and encodes it)."""

    channel: str
    topic: str
    data_json: str
    run_id: str | None = None


@dataclass(frozen=True)
class Message:
    id: int
    channel: str
    topic: str
    data_json: str
    run_id: str | None
    created_at: datetime
    replayed: bool = False  # an Idempotency-Key repeat: stored by an earlier publish

    @property
    def data(self) -> Any:
        return json.loads(self.data_json)

    def envelope(self) -> dict[str, Any]:
        return json.loads(self.envelope_json())

    def envelope_json(self) -> str:
        """The JSON line of CONTRACT §4, built around the stored data text without re-encoding it."""
        dump = json.dumps
        created_at = self.created_at.astimezone(timezone.utc).isoformat(timespec="microseconds")
        return (
            f'{{"id": {self.id}, "channel": {dump(self.channel)}, "topic": {dump(self.topic)}, '
            f'"data": {self.data_json}, "run_id": {dump(self.run_id)}, '
            f'"created_at": {dump(created_at)}}}'
        )


# INSERT one message, through SQLAlchemy (SQLite, and in a caller's transaction); _INSERT_SQL is
# the same statement for PostgreSQL's hot path.
_INSERT = insert(messages).values(
    {name: bindparam(name) for name in ("channel", "topic", "data", "run_id", "created_at")}
).returning(messages.c.id)


def create_schema(engine: Engine) -> None:
    """Create the tables if missing and the database's epoch once. Safe to race."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(_SCHEMA_LOCK)))
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        metadata.create_all(conn)
        conn.execute(upsert(engine, meta).values(key="epoch", value=secrets.token_hex(4)).on_conflict_do_nothing())


class Page(list):
    """Messages of one read, oldest first; `more` when the read stopped at its row or byte
    limit, so the next read (after the last id) may find more."""

    more: bool = False
    #: `read_replay`: the channel's highest pruned id, read just after the page.
    pruned_through: int = 0
    #: Set by the readers of a shared page (replay.py, stream.py): the page this one is the
    #: start of, and the frames of its messages, built once for every stream replaying it.
    source: Page | None = None
    frames: list[bytes] | None = None


def _message(row: Any) -> Message:
    return Message(row.id, row.channel, row.topic, row.data, row.run_id, as_utc(row.created_at))


class MessageStore:
    """Append-only log of messages with per-channel reads and age-based pruning."""

    def __init__(self, db: Database, *, now: Callable[[], datetime] = utcnow) -> None:
        self.db = db
        self.engine = db.engine
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self._now = now
        self._epoch: str | None = None
        self.reads = 0  # SELECTs issued by this store (tests; /metrics counts them for operators)
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
        exists only if the caller commits (a transactional outbox). Readers
        wait at the hole its id leaves until then, so keep such transactions
        short.

        With `idempotency_key`, a repeat on the same channel stores nothing
        and returns the message the first one stored, `replayed` set.
        """
        def committed() -> None:
            metrics.MESSAGES_PUBLISHED.inc()
            if on_commit is not None:
                on_commit()

        if session is not None:
            message = self._append(session.connection(), channel, topic, data_json, run_id, idempotency_key)
            if not message.replayed:
                event.listen(session, "after_commit", lambda _session: committed(), once=True)
            return message
        if self.is_postgres and idempotency_key is None:
            message = self._append_alone(channel, topic, data_json, run_id)
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
            ids = self._append_batch(items, created_at)
        else:
            rows = [
                {"channel": m.channel, "topic": m.topic, "data": m.data_json, "run_id": m.run_id, "created_at": created_at}
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
            Message(message_id, m.channel, m.topic, m.data_json, m.run_id, created_at)
            for message_id, m in zip(ids, items)
        ]

    def _append_batch(self, items: Sequence[NewMessage], created_at: datetime) -> list[int]:
        """PostgreSQL: one INSERT of the whole batch from arrays (a fifth of the CPU of
        SQLAlchemy's executemany for 1,000 rows, bench/publish.py), one transaction."""
        columns = ([m.channel for m in items], [m.topic for m in items], [m.data_json for m in items],
                   [m.run_id for m in items])
        with self._driver() as driver, driver.transaction():
            ids = [row[0] for row in driver.execute(_INSERT_MANY_SQL, (created_at, *columns))]
        return sorted(ids)

    def _append_alone(self, channel: str, topic: str, data_json: str, run_id: str | None) -> Message:
        """PostgreSQL, the hot path: one INSERT that is its own transaction, one
        round trip, one commit, on the pool's connection without SQLAlchemy's
        per-statement layers (half the CPU of a publish, bench/publish.py)."""
        created_at = self._now()
        with self._driver() as driver:
            driver.autocommit = True
            message_id = driver.execute(_INSERT_SQL, (channel, topic, data_json, run_id, created_at)).fetchone()[0]
            driver.autocommit = False
        return Message(message_id, channel, topic, data_json, run_id, created_at)

    @contextmanager
    def _driver(self) -> Iterator[Any]:
        """The psycopg connection of a pooled one, for the two hot paths above; back to the
        pool after, or discarded after an error: it may be mid-query (a timeout, a lost server)."""
        raw = self.engine.raw_connection()
        try:
            yield raw.driver_connection
        except BaseException:
            raw.invalidate()
            raise
        raw.close()

    def _append(
        self, conn: Connection, channel: str, topic: str, data_json: str, run_id: str | None,
        idempotency_key: str | None,
    ) -> Message:
        created_at = self._now()
        if not self.is_postgres:
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
                return replace(_message(first), replayed=True)
        values = {"channel": channel, "topic": topic, "data": data_json, "run_id": run_id, "created_at": created_at}
        row = conn.execute(_INSERT, values).one()
        if idempotency_key is not None:
            conn.execute(insert(idempotency).values(
                channel=channel, key=idempotency_key, message_id=row.id, created_at=created_at
            ))
        return Message(row.id, channel, topic, data_json, run_id, created_at)

    @database_call
    def prune(self, max_age: timedelta) -> int:
        """Delete messages older than `max_age`; return how many.

        Deletes a prefix of ids (everything up to the newest expired one), and
        records per channel the highest id removed, so a stream whose cursor
        fell below it can say `history_truncated` instead of skipping silently.
        """
        cutoff = self._now() - max_age
        with self.engine.begin() as conn:
            if not self.is_postgres:
                self._lock(conn)
            newest_expired = conn.execute(
                select(func.max(messages.c.id)).where(messages.c.created_at < cutoff)
            ).scalar()
            if newest_expired is None:
                return 0
            per_channel = conn.execute(
                select(messages.c.channel, func.max(messages.c.id).label("through_id"))
                .where(messages.c.id <= newest_expired)
                .group_by(messages.c.channel)
            ).all()
            conn.execute(idempotency.delete().where(idempotency.c.created_at < cutoff))
            statement = upsert(self.engine, pruned)
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[pruned.c.channel],
                    set_={
                        "through_id": case(
                            (statement.excluded.through_id > pruned.c.through_id, statement.excluded.through_id),
                            else_=pruned.c.through_id,
                        )
                    },
                ),
                [{"channel": r.channel, "through_id": r.through_id} for r in per_channel],
            )
            return conn.execute(messages.delete().where(messages.c.id <= newest_expired)).rowcount

    # -- reading ----------------------------------------------------------

    @database_call
    def read_after(
        self, channel: str, topics: Sequence[str] | None, after_id: int, limit: int,
        max_bytes: int = PAGE_BYTES, through: int | None = None,
    ) -> Page:
        """Messages of `channel` (and `topics`, None = all) with id > after_id (and <= `through`),
        oldest first: at most `limit` of them, and no more than `max_bytes` of data but the first."""
        return self._read_after(channel, topics, after_id, limit, max_bytes, through)

    @database_call
    def read_replay(
        self, channel: str, topics: Sequence[str] | None, after_id: int, limit: int,
        max_bytes: int, through: int,
    ) -> Page:
        """`read_after`, and where the channel was pruned through, read after the page: a prune
        that removed messages after a cursor before the page was read shows in
        `page.pruned_through`. One call for both, so a reconnect storm costs one database
        round per shared page (replay.py), not one lookup per stream."""
        page = self._read_after(channel, topics, after_id, limit, max_bytes, through)
        page.pruned_through = self._pruned_through(channel)
        return page

    def _read_after(
        self, channel: str, topics: Sequence[str] | None, after_id: int, limit: int,
        max_bytes: int, through: int | None,
    ) -> Page:
        where = [messages.c.channel == channel, messages.c.id > after_id]
        if through is not None:
            where.append(messages.c.id <= through)
        if topics is not None:
            where.append(messages.c.topic.in_(topics))
        return self._read_bounded(where, limit, max_bytes, kind="replay")

    @database_call
    def read_new(self, after_id: int, limit: int, max_bytes: int = PAGE_BYTES) -> Page:
        """The same for every channel: the dispatcher's read."""
        return self._read_bounded([messages.c.id > after_id], limit, max_bytes, kind="dispatcher")

    def _read_bounded(self, where: list[Any], limit: int, max_bytes: int, *, kind: str) -> Page:
        # Pages are bounded in bytes as well as rows: 500 rows of the largest
        # message would be 250 MB in memory, per stream replaying them. The
        # database sums the sizes over the page (a window over at most
        # `limit` ids, never their data) and returns the rows that start
        # before the budget is spent, so at least one.
        data_size = (
            func.octet_length(messages.c.data) if self.is_postgres
            else func.length(cast(messages.c.data, LargeBinary))
        )
        first = select(messages.c.id, data_size.label("size")).where(*where).order_by(messages.c.id).limit(limit).subquery()
        sized = select(
            first.c.id,
            first.c.size,
            func.sum(first.c.size).over(order_by=first.c.id).label("through"),
            func.count().over().label("rows"),
        ).subquery()
        query = (
            select(messages, sized.c.rows)
            .join(sized, messages.c.id == sized.c.id)
            .where(sized.c.through - sized.c.size < max_bytes)
            .order_by(messages.c.id)
        )
        self._count_read(kind)
        with self.engine.connect() as conn:
            found = conn.execute(query).all()
        page = Page(_message(row) for row in found)
        # Full in rows (more may follow), or cut short by the byte budget.
        page.more = bool(found) and (found[0].rows >= limit or len(found) < found[0].rows)
        return page

    def _count_read(self, kind: str) -> None:
        """A SELECT of messages: for tests (`reads`) and for operators (/metrics, by kind)."""
        self.reads += 1
        metrics.STORE_READS.labels(kind).inc()

    # -- where readers may go (the module docstring) -------------------------

    @database_call
    def writers_in_flight(self) -> frozenset[str]:
        """The transactions writing messages right now (PostgreSQL; empty on SQLite)."""
        if not self.is_postgres:
            return frozenset()
        with self.engine.connect() as conn:
            return frozenset(conn.execute(_WRITERS).scalars())

    @database_call
    def any_in_flight(self, writers: frozenset[str]) -> bool:
        """Whether any of these transactions is still running."""
        if not writers:
            return False
        with self.engine.connect() as conn:
            return conn.execute(_STILL_RUNNING, {"writers": list(writers)}).scalar_one()

    @database_call
    def settled_id(self) -> int:
        """An id below which every message is visible or never will be: where a reader may read up to.

        SQLite: the newest id. PostgreSQL: the last id drawn, once the
        writers that were in flight when it was read have ended (usually
        milliseconds: each holds one append).
        """
        if not self.is_postgres:
            return self._max_id()
        with self.engine.connect() as conn:
            drawn = conn.execute(_LAST_DRAWN).scalar_one()
            writers = frozenset(conn.execute(_WRITERS).scalars())
            while writers and conn.execute(_STILL_RUNNING, {"writers": list(writers)}).scalar_one():
                conn.rollback()  # a fresh snapshot for the next look
                threading.Event().wait(0.002)
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
        return self._pruned_through(channel)

    def _pruned_through(self, channel: str) -> int:
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
