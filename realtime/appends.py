"""PostgreSQL's two hot paths of `MessageStore`: one message, and a batch, each in one statement.

Both run on the pool's psycopg connection without SQLAlchemy's per-statement
layers (a fifth of the CPU for a batch of 1,000; bench/publish.py), and both
declare the channels' write intents before the rows draw their ids, in the
same statement (schema.py, visibility.py). SQLite, outbox (`session=`) and
idempotent publishes take the SQLAlchemy path in store.py.
"""
from __future__ import annotations

from contextlib import contextmanager
from datetime import datetime
from typing import Any, Iterator, Sequence

import psycopg
from sqlalchemy import Engine

from common.postgres import per_transaction

from .reads import Message, NewMessage
from .schema import INTENT, as_int4, intent_key

# One message, its channel's intent first: the CTE runs before the row draws its id.
_INSERT_SQL = (
    "WITH intent AS MATERIALIZED (SELECT pg_advisory_xact_lock_shared(%s, %s))"
    " INSERT INTO realtime_messages (channel, topic, data, run_id, created_at)"
    " SELECT %s, %s, %s, %s, %s FROM intent RETURNING id"
)
# A batch in one statement, its channels' intents first (an InitPlan, run before the first
# row is made): the rows come out of unnest in list order (ORDER BY n), and each draws its id
# from the sequence as it is inserted, so ids ascend in list order.
_INSERT_MANY_SQL = (
    f"WITH intent AS MATERIALIZED (SELECT pg_advisory_xact_lock_shared({INTENT}, k) FROM unnest(%b::int4[]) AS k)"
    " INSERT INTO realtime_messages (channel, topic, data, run_id, text_stream, text_seq, created_at)"
    " SELECT c, t, d, r, s, q, %s"
    " FROM unnest(%b::varchar[], %b::varchar[], %b::text[], %b::varchar[], %b::varchar[], %b::int4[])"
    " WITH ORDINALITY AS m(c, t, d, r, s, q, n) WHERE (SELECT count(*) FROM intent) >= 0 ORDER BY n RETURNING id"
)


def insert_one(
    engine: Engine, channel: str, topic: str, data_json: str, run_id: str | None, created_at: datetime
) -> Message:
    """One message in one statement that is its own transaction: one round trip."""
    values = (INTENT, as_int4(intent_key(channel)), channel, topic, data_json, run_id, created_at)
    with _driver(engine) as (driver, set_timeout):
        driver.autocommit = True
        if set_timeout:
            # Behind a pooler that dropped the session's statement timeout: one simple query
            # (values bound client-side), one implicit transaction, so SET LOCAL covers the INSERT.
            cursor = psycopg.ClientCursor(driver)
            cursor.execute(f"{set_timeout}; {_INSERT_SQL}", values)
            cursor.nextset()
            message_id = cursor.fetchone()[0]
        else:
            message_id = driver.execute(_INSERT_SQL, values).fetchone()[0]
        driver.autocommit = False
    return Message(message_id, channel, topic, data_json, run_id, created_at)


def insert_batch(engine: Engine, items: Sequence[NewMessage], created_at: datetime) -> list[int]:
    """The batch's intents, then one INSERT of the whole batch from arrays, one transaction;
    the ids in list order."""
    keys = sorted({as_int4(intent_key(channel)) for channel in {m.channel for m in items}})
    columns = ([m.channel for m in items], [m.topic for m in items], [m.data_json for m in items],
               [m.run_id for m in items], [m.text_stream for m in items], [m.text_seq for m in items])
    with _driver(engine) as (driver, set_timeout), driver.transaction():
        if set_timeout:
            driver.execute(set_timeout, prepare=False)
        ids = [row[0] for row in driver.execute(_INSERT_MANY_SQL, (keys, created_at, *columns))]
    return sorted(ids)


@contextmanager
def _driver(engine: Engine) -> Iterator[tuple[Any, str | None]]:
    """The psycopg connection of a pooled one, and the statement timeout its transactions must
    set themselves (None: the session has it; common/postgres.py); back to the pool after, or
    discarded after an error: it may be mid-query."""
    raw = engine.raw_connection()
    try:
        yield raw.driver_connection, per_transaction(raw)
    except BaseException:
        raw.invalidate()
        raise
    raw.close()
