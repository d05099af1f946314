"""The realtime tables, and the two facts about them every reader relies on.

- `realtime_messages.id` comes from a sequence with `CACHE 1` (PostgreSQL), so
  ids are drawn in the order writers ask for them, whichever backend asks: a
  cached range would let one backend hand out ids far below another's, long
  after a reader moved past them. Checked when the schema is created.
- Every writer declares a *write intent* on its channel before it draws an id
  (visibility.py): a shared, transaction-scoped advisory lock keyed by the
  channel's hash. Readers then know which channels a transaction still in flight
  may add to, and hold back only those.

Prepared (two-phase) transactions are not supported: a prepared transaction
keeps its locks with no backend, so a reader could not name what it waits for.
"""
from __future__ import annotations

import hashlib
import logging
import secrets

from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    select,
    text,
)

from common.database import DatabaseUnavailable, add_missing_columns_in, add_missing_indexes, upsert

log = logging.getLogger(__name__)

metadata = MetaData()

# BIGINT on PostgreSQL; on SQLite it must be exactly INTEGER to be the rowid
# alias that AUTOINCREMENT applies to.
Id = BigInteger().with_variant(Integer(), "sqlite")

messages = Table(
    "realtime_messages",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("channel", String(200), nullable=False),
    Column("topic", String(100), nullable=False),
    Column("data", Text, nullable=False),  # the JSON text, sent as is
    Column("run_id", String(64)),
    Column("created_at", DateTime(timezone=True), nullable=False),
    # A text stream's messages (text_streams.py): its id and each message's seq; NULL on
    # other messages. What lets a replay fold a stream's deltas into its text (folding.py).
    Column("text_stream", String(200)),
    Column("text_seq", Integer),
    Index("ix_realtime_messages_channel_id", "channel", "id"),
    Index("ix_realtime_messages_created_at", "created_at"),
    Index(
        "ix_realtime_messages_text_stream", "channel", "text_stream", "id",
        postgresql_where=text("text_stream IS NOT NULL"), sqlite_where=text("text_stream IS NOT NULL"),
    ),
    # Each attempt's start: a flush asks whether a newer attempt of its streams began (text_streams.py).
    Index(
        "ix_realtime_messages_text_starts", "channel", "text_stream", "id",
        postgresql_where=text("text_seq = 0"), sqlite_where=text("text_seq = 0"),
    ),
    sqlite_autoincrement=True,
)

# The highest id pruned from each channel: a cursor below it has lost history.
pruned = Table(
    "realtime_pruned",
    metadata,
    Column("channel", String(200), primary_key=True),
    Column("through_id", Id, nullable=False),
)

# Idempotency-Key -> the message its first publish stored, kept as long as the message is.
idempotency = Table(
    "realtime_idempotency",
    metadata,
    Column("channel", String(200), primary_key=True),
    Column("key", String(200), primary_key=True),
    Column("message_id", Id, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Index("ix_realtime_idempotency_created_at", "created_at"),
    Index("ix_realtime_idempotency_message_id", "message_id"),
)

meta = Table(
    "realtime_meta",
    metadata,
    Column("key", String(50), primary_key=True),
    Column("value", String(200), nullable=False),
)

NOTIFY_CHANNEL = "realtime_messages"
SEQUENCE = "realtime_messages_id_seq"

# Advisory lock namespaces (the first of the two int4 keys), arbitrary constants:
SCHEMA_LOCK = 0x5EA1_0002  # creating the schema
INTENT = 0x5EA1_0003  # a write intent on a channel: the second key is the channel's hash
NO_NEW_IDS = 0x5EA1_0004  # a writer of the table that draws no ids (the pruner): hold nothing back
PRUNER = 0x5EA1_0005  # a transaction of the pruner: one at a time across processes and instances


class SchemaError(DatabaseUnavailable):
    """The database's realtime schema breaks an assumption the readers rely on (the log says which)."""


def intent_key(channel: str) -> int:
    """A channel's write-intent key: 32 bits of its MD5, as `pg_locks.objid` shows it (unsigned).

    The same function exists in SQL (`INTENT_KEY_SQL`), so a reader can ask
    the database for the rows of the channels behind one key.
    """
    return int.from_bytes(hashlib.md5(channel.encode()).digest()[:4], "big")


def as_int4(key: int) -> int:
    """The key as `pg_advisory_xact_lock_shared(int4, int4)` takes it (signed)."""
    return key - (1 << 32) if key >= 1 << 31 else key


#: `intent_key` in SQL (signed int4, so compare with `as_int4`).
INTENT_KEY_SQL = "('x' || substr(md5(channel), 1, 8))::bit(32)::int"


def create_schema(engine: Engine) -> None:
    """Create the tables if missing and the database's epoch once; check the sequence. Safe to race."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK)))
        else:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        metadata.create_all(conn)
        # What later versions added, for a database an older one made: the text stream
        # columns and their index (issue 20), idempotency's message_id index (issue 17).
        add_missing_columns_in(conn, messages)
        add_missing_indexes(conn, messages)
        add_missing_indexes(conn, idempotency)
        conn.execute(upsert(engine, meta).values(key="epoch", value=secrets.token_hex(4)).on_conflict_do_nothing())
        if engine.dialect.name == "postgresql":
            cache = conn.execute(
                text("SELECT seqcache FROM pg_sequence WHERE seqrelid = CAST(:name AS regclass)"), {"name": SEQUENCE}
            ).scalar_one()
            if cache != 1:
                log.error(
                    "the sequence %s has CACHE %d; it must be CACHE 1, or live streams may skip messages: "
                    "ALTER SEQUENCE %s CACHE 1", SEQUENCE, cache, SEQUENCE,
                )
                raise SchemaError("the database's realtime schema is misconfigured; the server log says how to fix it")
