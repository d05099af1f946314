"""Retention (realtime/prune.py): batches, one pruner at a time, keys with their messages, bounded marks.

The first tests run on SQLite and PostgreSQL with a clock the test moves. The
last ones build a PostgreSQL backlog that one DELETE cannot remove within the
statement timeout, as a pruner that was down for a while finds it.
"""
from __future__ import annotations

import multiprocessing
import threading
from dataclasses import replace
from datetime import datetime, timedelta
from functools import partial
from unittest import mock

import psycopg
import pytest
from sqlalchemy import event, func, select

import common.database
from common.database import Database, make_engine
from conftest import FakeClock
from realtime.prune import PRUNER, Pruner
from realtime.schema import idempotency, messages, pruned
from realtime.store import MessageStore

HOUR = timedelta(hours=1)


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(database_url, clock):
    db = Database(database_url)
    yield MessageStore(db, now=clock)
    db.dispose()


def marks(store: MessageStore) -> dict[str, int]:
    with store.engine.connect() as conn:
        return dict(conn.execute(select(pruned.c.channel, pruned.c.through_id)).all())


def count(store: MessageStore, table=messages) -> int:
    with store.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_prune_deletes_old_messages_and_remembers_where_per_channel(store, clock):
    old_a = store.append("a", "t", "1")
    old_b = store.append("b", "t", "2")
    clock.now += timedelta(hours=2)
    kept = store.append("a", "t", "3")
    assert store.prune(HOUR) == 2
    assert [m.id for m in store.read_after("a", None, 0, 10)] == [kept.id]
    assert store.pruned_through("a") == old_a.id
    assert store.pruned_through("b") == old_b.id
    assert store.pruned_through("never-pruned") == 0
    assert store.prune(HOUR) == 0


def test_ids_are_never_reused_after_pruning_everything(store, clock):
    last = store.append("a", "t", "1")
    clock.now += timedelta(days=2)
    store.prune(timedelta(days=1))
    assert store.append("a", "t", "2").id > last.id


def test_a_round_goes_a_batch_at_a_time_oldest_first_until_its_time_is_spent(store, clock):
    expired = [store.append(channel, "t", "1") for channel in "abacbcc"]
    clock.now += timedelta(hours=2)
    kept = store.append("a", "t", "2")
    seconds = [0.0]
    pruner = Pruner(store.db, now=clock, clock=lambda: seconds[0])
    pruner.batch_size, pruner.round_s = 2, 2.5
    delete_batch = pruner._delete_batch

    def a_second_each(*args):
        seconds[0] += 1
        return delete_batch(*args)

    pruner._delete_batch = a_second_each
    first = pruner.run(HOUR)
    assert (first.removed, first.batches, first.behind) == (6, 3, True), "three batches in 2.5 s, then it stops"
    assert [m.id for m in store.read_after("c", None, 0, 10)] == [expired[6].id], "oldest first"
    assert marks(store) == {"a": expired[2].id, "b": expired[4].id, "c": expired[5].id}
    second = pruner.run(HOUR)
    assert (second.removed, second.batches, second.behind) == (1, 1, False)
    assert marks(store) == {"a": expired[2].id, "b": expired[4].id, "c": expired[6].id}
    assert [m.id for m in store.read_after("a", None, 0, 10)] == [kept.id]


def test_a_key_goes_with_its_message_so_a_repeat_after_the_prune_stores_anew(store, clock):
    keyed = store.append("c", "t", "1", idempotency_key="k")
    clock.now -= timedelta(hours=2)  # a publisher whose clock is two hours behind
    store.append("c", "t", "2")
    clock.now += timedelta(hours=2, minutes=30)
    # Ids go in order of publishing: the prune deletes every id up to the one
    # that expired, the keyed message with it, and so its key, however young.
    assert store.prune(HOUR) == 2
    again = store.append("c", "t", "3", idempotency_key="k")
    assert not again.replayed and again.id > keyed.id
    assert store.append("c", "t", "3", idempotency_key="k") == replace(again, replayed=True)
    assert count(store, idempotency) == 1


def test_marks_of_silent_channels_go_once_they_stood_a_retention(store, clock):
    """Every 15 minutes a run publishes on a channel of its own and then falls silent;
    a channel with retained messages keeps its mark; the table stays bounded."""
    store.append("lasting", "t", "first")
    appeared: dict[str, datetime] = {}
    most = 0
    for step in range(40):  # ten hours, ten retentions
        store.append(f"run.{step}", "t", "done")
        store.append("lasting", "t", str(step))
        clock.now += timedelta(minutes=15)
        store.prune(HOUR)
        present = marks(store)
        for channel in present.keys() - appeared.keys():
            appeared[channel] = clock.now
        for channel in appeared.keys() - present.keys():
            assert clock.now - appeared.pop(channel) >= HOUR, f"{channel}'s mark stood a retention at least"
        most = max(most, len(present))
    assert "lasting" in present, "a channel with retained messages keeps its mark"
    assert most <= 8 + 1, f"{most} marks: more than the runs of the last two retentions, and 'lasting'"
    assert count(store) == 2 * 4, "the messages of the last hour: two every 15 minutes"


def test_a_second_round_in_the_same_process_does_nothing(store, clock):
    store.append("c", "t", "1")
    clock.now += timedelta(hours=2)
    in_batch: list[bool] = []
    inside, go_on = threading.Event(), threading.Event()
    delete_batch = store.pruner._delete_batch

    def held_batch(*args):
        in_batch.append(True)
        inside.set()
        go_on.wait()
        return delete_batch(*args)

    def first_round() -> None:
        try:
            store.prune(HOUR)
        finally:
            inside.set()  # also when it never reached a batch: the assertion below says so

    store.pruner._delete_batch = held_batch
    first = threading.Thread(target=first_round)
    first.start()
    inside.wait()
    try:
        assert in_batch, "the first round is inside its batch"
        second = store.pruner.run(HOUR)
        assert (second.removed, second.busy) == (0, True)
    finally:
        go_on.set()
        first.join()
    assert count(store) == 0


# -- PostgreSQL: a backlog, and pruners in other processes ------------------------------------


BACKLOG = 200_000
RETENTION = timedelta(days=1)
TIMEOUT_S = 0.05  # a batch statement takes 1-5 ms; one DELETE of the whole backlog, 100 or more
BATCH = 1000


def database(url: str, statement_timeout_s: float) -> Database:
    """A Database whose statements the server cancels after `statement_timeout_s`."""
    with mock.patch.object(common.database, "make_engine", partial(make_engine, statement_timeout_s=statement_timeout_s)):
        return Database(url)


def build_backlog(url: str) -> None:
    """BACKLOG messages two days old, one a millisecond, on 100 channels, every tenth with a key."""
    db = Database(url)
    MessageStore(db).epoch  # creates the schema
    db.dispose()
    with psycopg.connect(url.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO realtime_messages (channel, topic, data, created_at)"
            " SELECT 'run.' || n %% 100, 'status', '{\"percent\": 10}', now() - interval '2 days' + n * interval '1 ms'"
            " FROM generate_series(1, %s) AS n", (BACKLOG,),
        )
        conn.execute(
            "INSERT INTO realtime_idempotency (channel, key, message_id, created_at)"
            " SELECT channel, 'key-' || id, id, created_at FROM realtime_messages WHERE id % 10 = 0"
        )
        conn.execute("ANALYZE")


@pytest.fixture
def backlog_url(postgres_url):
    build_backlog(postgres_url)
    return postgres_url


def test_a_backlog_one_delete_cannot_remove_within_the_statement_timeout_goes_in_batches(backlog_url):
    db = database(backlog_url, TIMEOUT_S)
    store = MessageStore(db)
    store.pruner.batch_size = BATCH
    try:
        assert store.prune(RETENTION) == BACKLOG
        assert count(store) == count(store, idempotency) == 0
        assert marks(store) == {f"run.{n}": BACKLOG - (BACKLOG - n) % 100 for n in range(100)}
    finally:
        db.dispose()


def test_a_round_ends_at_once_while_another_pruner_is_at_work(backlog_url):
    db = Database(backlog_url)
    store = MessageStore(db)
    try:
        with psycopg.connect(backlog_url.replace("+psycopg", "")) as other:  # a batch in flight elsewhere
            other.execute("SELECT pg_advisory_xact_lock(%s, 0)", (PRUNER,))
            skipped = store.pruner.run(RETENTION)
            assert (skipped.removed, skipped.busy) == (0, True)
            assert count(store) == BACKLOG
        assert store.prune(RETENTION) == BACKLOG
    finally:
        db.dispose()


def test_while_a_batch_is_in_flight_readers_go_on_and_other_pruners_stand_aside(postgres_url, clock):
    db, other_db = Database(postgres_url), Database(postgres_url)
    store, other = MessageStore(db, now=clock), MessageStore(other_db, now=clock)
    for n in range(3):
        store.append("c", "t", str(n))
    clock.now += timedelta(hours=2)
    inside, go_on = threading.Event(), threading.Event()

    @event.listens_for(db.engine, "after_cursor_execute")
    def hold_the_batch_open(conn, cursor, statement, *args) -> None:
        if statement.startswith("DELETE FROM realtime_messages"):
            inside.set()
            go_on.wait()

    first = threading.Thread(target=store.prune, args=(HOUR,))
    first.start()
    try:
        inside.wait()
        assert not other.writers(), "the batch draws no ids: no reader waits for it"
        busy = other.pruner.run(HOUR)
        assert (busy.removed, busy.busy) == (0, True)
    finally:
        go_on.set()
        first.join()
        db.dispose()
        other_db.dispose()


def _prune_in_another_process(url: str, start, results) -> None:
    db = database(url, TIMEOUT_S)
    store = MessageStore(db)
    store.pruner.batch_size = BATCH
    store.epoch
    start.wait()
    results.put(store.prune(RETENTION))
    db.dispose()


def test_two_pruners_racing_delete_every_message_once(backlog_url):
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_prune_in_another_process, args=(backlog_url, start, results)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    assert results.get(timeout=5) + results.get(timeout=5) == BACKLOG
    db = Database(backlog_url)
    try:
        store = MessageStore(db)
        assert count(store) == 0
        assert marks(store) == {f"run.{n}": BACKLOG - (BACKLOG - n) % 100 for n in range(100)}
    finally:
        db.dispose()
