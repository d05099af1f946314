"""Holes and write intents on a real PostgreSQL: a transaction in flight holds back its own
channels only, every live stream gets every message once, in order (issue 17, items 1, 4, 6)."""
from __future__ import annotations

import logging
import threading

import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from common.database import Database
from conftest import PG_ADMIN_URL, create_pg_database, drop_pg_database, skip_or_fail, wait_until
from realtime import metrics
from realtime.dispatch import Dispatcher
from realtime.schema import INTENT, NO_NEW_IDS, SchemaError, as_int4, create_schema, intent_key
from realtime.store import MessageStore, NewMessage
from test_dispatch import Feed  # a change feed the test drives by hand

pytestmark = pytest.mark.postgres


class Clock:
    """Monotonic seconds that move only when the test says so (the probe's and the dispatcher's)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(postgres_url):
    db = Database(postgres_url)
    store = MessageStore(db)
    db.ensure_schema()
    yield store
    db.dispose()


@pytest.fixture
def dispatcher(store):
    dispatcher = Dispatcher(store, Feed(), buffer_size=100_000)
    dispatcher.prime()
    yield dispatcher
    dispatcher.stop()


def ids_of(subscription) -> list[int]:
    return [message_id for message_id, _ in subscription.take() if message_id]


def open_publish(store: MessageStore, channel: str, data: str = '"open"') -> tuple[Session, int]:
    """A caller's transaction that published on `channel` and stays open: (session, its message id)."""
    session = Session(store.engine)
    message = store.append(channel, "t", data, session=session)
    return session, message.id


def batch(channel: str, count: int) -> list[NewMessage]:
    return [NewMessage(channel, "t", str(n)) for n in range(count)]


def test_a_hole_before_large_batches_loses_nothing(store, dispatcher):
    """The review's reproduction: one publish stays open while batches of 1,000 and 700 commit on
    its channel; before, the live stream missed the message at the 500-row page boundary."""
    subscription = dispatcher.subscribe("c", None)
    session, held = open_publish(store, "c")
    stored = [m.id for m in store.append_many(batch("c", 1000))]
    dispatcher.dispatch_new()
    stored += [m.id for m in store.append_many(batch("c", 700))]
    dispatcher.dispatch_new()
    assert ids_of_now(subscription) == [], "held behind the open transaction: nothing out of order"
    session.commit()
    session.close()
    dispatcher.dispatch_new()
    assert ids_of(subscription) == sorted([held, *stored]), "all 1,701, each once, in id order"
    assert not dispatcher.waiting_on_a_hole


def ids_of_now(subscription) -> list[int]:
    """What is queued, without waiting."""
    return ids_of(subscription) if subscription.queued else []


def test_an_open_transaction_on_one_channel_never_holds_another(store, dispatcher):
    a, b = dispatcher.subscribe("a", None), dispatcher.subscribe("b", None)
    session, held = open_publish(store, "a")
    later_a = store.append("a", "t", '"after"').id
    first_b = store.append("b", "t", '"1"').id
    dispatcher.dispatch_new()
    assert ids_of(b) == [first_b], "b's message goes out while a's transaction is open"
    assert ids_of_now(a) == [], "a's later message waits for the hole before it"
    assert dispatcher.subscribe("b", None).history_through >= first_b, "b's history reaches past the hole"
    assert dispatcher.subscribe("a", None).history_through < held, "a's history stops before its hole"
    session.commit()
    session.close()
    dispatcher.dispatch_new()
    assert ids_of(a) == [held, later_a]


def test_a_rolled_back_hole_releases_its_channel(store, dispatcher):
    a = dispatcher.subscribe("a", None)
    session, _ = open_publish(store, "a")
    after = store.append("a", "t", '"after"').id
    dispatcher.dispatch_new()
    session.rollback()
    session.close()
    dispatcher.dispatch_new()
    assert ids_of(a) == [after]
    assert not dispatcher.waiting_on_a_hole


def test_history_of_another_channel_does_not_wait(store):
    session, _ = open_publish(store, "a")
    b = store.append("b", "t", '"1"').id
    assert store.settled_through("b") >= b  # returns: nothing to wait for on b
    session.rollback()
    session.close()


def test_a_process_starting_beside_an_open_transaction_waits_for_nothing(store):
    session, held = open_publish(store, "a")
    dispatcher = Dispatcher(store, Feed())
    dispatcher.prime()  # returns at once
    assert dispatcher.position >= held
    assert dispatcher.subscribe("b", None).history_settled
    assert not dispatcher.subscribe("a", None).history_settled, "a's history waits for its transaction"
    session.commit()
    session.close()
    dispatcher.stop()


def test_the_pruner_holds_back_nothing(store, dispatcher):
    b = dispatcher.subscribe("b", None)
    old = store.append("b", "t", '"old"').id
    dispatcher.dispatch_new()
    ids_of(b)
    with store.engine.connect() as pruner:
        # A pruning transaction in flight: it declares it draws no ids, then deletes.
        pruner.execute(text(f"SELECT pg_advisory_xact_lock_shared({NO_NEW_IDS}, 0)"))
        pruner.execute(text("DELETE FROM realtime_messages WHERE id = :id"), {"id": old})
        rolled_back, _ = open_publish(store, "x")
        rolled_back.rollback()  # a hole, so the reader asks who is in flight
        rolled_back.close()
        new = store.append("b", "t", '"new"').id
        dispatcher.dispatch_new()
        assert ids_of(b) == [new]
        pruner.rollback()


def test_a_write_without_an_intent_holds_every_channel_until_it_ends(store, dispatcher, caplog):
    """An INSERT by hand (psql) may be on any channel; its pid is named once it waited a second."""
    clock = Clock()
    store.probe.clock = clock
    b = dispatcher.subscribe("b", None)
    with store.engine.connect() as by_hand:
        pid = by_hand.execute(text("SELECT pg_backend_pid()")).scalar_one()
        by_hand.execute(text(
            "INSERT INTO realtime_messages (channel, topic, data, created_at) VALUES ('b', 't', '\"hand\"', now())"
        ))
        after = store.append("b", "t", '"after"').id
        dispatcher.dispatch_new()
        assert ids_of_now(b) == []
        clock.now += 1.5
        with caplog.at_level(logging.WARNING, logger="realtime.visibility"):
            dispatcher.dispatch_new()
        assert [r for r in caplog.records if f"backend pid {pid}" in r.getMessage()], caplog.text
        assert metrics.VISIBILITY_WAIT._value.get() >= 1.5
        by_hand.commit()
    dispatcher.dispatch_new()
    got = ids_of(b)
    assert got[-1] == after and len(got) == 2


def test_the_intent_is_declared_before_the_id_is_drawn(store):
    """What lets a reader trust the intents: any id drawn belongs to a transaction that already
    shows its channel in pg_locks. Held off by an exclusive lock on the key, no path draws an id."""
    key = as_int4(intent_key("c"))
    paths = {
        "alone": lambda: store.append("c", "t", "1"),
        "batch": lambda: store.append_many(batch("c", 3)),
        "outbox": lambda: _publish_and_commit(store, "c"),
        "idempotent": lambda: store.append("c", "t", "1", idempotency_key="k"),
    }
    for name, publish in paths.items():
        with psycopg.connect(store.engine.url.render_as_string(hide_password=False).replace("+psycopg", "")) as holder:
            holder.execute("SELECT pg_advisory_lock(%s, %s)", (INTENT, key))
            drawn = _last_drawn(holder)
            done = threading.Event()
            thread = threading.Thread(target=lambda: (publish(), done.set()))
            thread.start()
            wait_until(lambda: _waiting_on_advisory(holder), what=f"{name}: the publish waits on its intent")
            assert _last_drawn(holder) == drawn, f"{name} drew an id before its intent"
            holder.execute("SELECT pg_advisory_unlock(%s, %s)", (INTENT, key))
            thread.join(30)
            assert done.is_set()


def _publish_and_commit(store: MessageStore, channel: str) -> None:
    with Session(store.engine) as session:
        store.append(channel, "t", "1", session=session)
        session.commit()


def _last_drawn(conn) -> int:
    return conn.execute("SELECT last_value FROM realtime_messages_id_seq").fetchone()[0]


def _waiting_on_advisory(conn) -> bool:
    return conn.execute(
        "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())"
    ).fetchone()[0]


def test_writers_of_another_database_are_not_ours(store):
    other = create_pg_database()
    if other is None:
        skip_or_fail("PostgreSQL is not reachable")
    try:
        db = Database(PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + other)
        elsewhere = MessageStore(db)
        with Session(db.engine) as session:
            elsewhere.append("c", "t", "1", session=session)  # in flight, same channel, same table name
            assert not store.writers()
            session.rollback()
        db.dispose()
    finally:
        drop_pg_database(other)


def test_a_rolled_back_outbox_publish_never_counts_or_wakes_on_a_later_commit(store):
    woken: list[str] = []
    with Session(store.engine) as session:
        store.append("c", "t", "1", session=session, on_commit=lambda: woken.append("rolled back"))
        session.rollback()
        session.execute(text("SELECT 1"))
        session.commit()  # a later, unrelated transaction
        store.append("c", "t", "2", session=session, on_commit=lambda: woken.append("committed"))
        session.commit()
    assert woken == ["committed"]


def test_a_sequence_with_a_cache_is_refused_at_schema_creation(store, caplog):
    with store.engine.begin() as conn:
        conn.execute(text("ALTER SEQUENCE realtime_messages_id_seq CACHE 20"))
    with caplog.at_level(logging.ERROR), pytest.raises(SchemaError):
        create_schema(store.engine)
    assert "ALTER SEQUENCE realtime_messages_id_seq CACHE 1" in caplog.text
