"""The message store on SQLite and on a fresh PostgreSQL database."""
from __future__ import annotations

import multiprocessing
import random
import time
from datetime import datetime, timezone

import pytest
from sqlalchemy.orm import Session

from common.database import Database
from realtime.store import MessageStore


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 28, 6, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(database_url, clock):
    db = Database(database_url)
    yield MessageStore(db, now=clock)
    db.dispose()


def test_append_then_read_after_in_id_order(store):
    first = store.append("run.1", "status", '{"p": 1}')
    store.append("run.2", "status", '{"p": 9}')
    second = store.append("run.1", "log", '"line"', run_id="r1")
    found = store.read_after("run.1", None, 0, 100)
    assert [m.id for m in found] == [first.id, second.id]
    assert found[1].data == "line" and found[1].run_id == "r1"
    assert [m.id for m in store.read_after("run.1", ["log"], 0, 100)] == [second.id]
    assert list(store.read_after("run.1", None, second.id, 100)) == []
    assert [m.id for m in store.read_after("run.1", None, 0, 1)] == [first.id]
    assert store.last_id() == second.id


def test_envelope_is_contract_json(store):
    message = store.append("run.42", "status", '{"stage": "fetching", "percent": 10}', run_id="abc")
    assert message.envelope_json() == (
        f'{{"id": {message.id}, "channel": "run.42", "topic": "status", '
        '"data": {"stage": "fetching", "percent": 10}, "run_id": "abc", '
        '"created_at": "2026-11-28T06:00:00.000000+00:00"}'
    )
    assert store.read_after("run.42", None, 0, 1)[0].envelope() == message.envelope()


def test_schema_creation_is_idempotent_and_keeps_the_epoch(store, database_url):
    epoch = store.epoch  # the first call created the schema
    db = Database(database_url)
    try:
        again = MessageStore(db)
        assert again.epoch == epoch and again.last_id() == 0
        assert len(epoch) == 8
    finally:
        db.dispose()


@pytest.mark.parametrize("commit", [True, False])
def test_append_in_callers_transaction_exists_only_if_it_commits(store, commit):
    with Session(store.engine) as session:
        message = store.append("run.1", "status", "1", session=session)
        assert message.id > 0
        session.commit() if commit else session.rollback()
    assert [m.id for m in store.read_after("run.1", None, 0, 10)] == ([message.id] if commit else [])


# -- never past a late commit ---------------------------------------------------------
#
# Writers in several processes hold their transaction open for a random moment
# after drawing an id, and some roll back. PostgreSQL commits id 11 before id 10
# all the time here; a reader that moved past 11 would never see 10. The
# dispatcher, the process's one tailing reader, must deliver every committed id
# once, in id order, and step over the rolled-back ones.


def _slow_writer(database_url: str, writer: int, count: int) -> None:
    db = Database(database_url)
    store = MessageStore(db)
    rng = random.Random(writer)
    for n in range(count):
        with Session(db.engine) as session:
            store.append("race", "t", str(n), session=session)
            time.sleep(rng.random() * 0.003)
            if rng.random() < 0.1:
                session.rollback()  # a hole in the ids, for good
            else:
                session.commit()
    db.dispose()


class _NoFeed:
    def wait(self, timeout: float) -> bool:
        raise AssertionError("the test drives the dispatcher")

    def poke(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_the_tailing_reader_never_skips_a_late_commit_and_steps_over_rollbacks(store):
    from realtime.dispatch import Dispatcher

    writers, per_writer = 4, 40
    dispatcher = Dispatcher(store, _NoFeed(), buffer_size=10_000)
    subscription = dispatcher.subscribe("race", None)
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_slow_writer, args=(store.engine.url.render_as_string(hide_password=False), w, per_writer))
        for w in range(writers)
    ]
    for process in processes:
        process.start()
    writing = True
    while writing or dispatcher.waiting_on_a_hole:
        writing = any(process.is_alive() for process in processes)
        dispatcher.dispatch_new()  # and once more after every writer ended
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    seen = [message_id for message_id, _ in subscription.take()]
    stored = [m.id for m in store.read_after("race", None, 0, 10_000)]
    assert 0 < len(stored) < writers * per_writer, "some appends rolled back"
    assert seen == stored, "every committed id, each once, in order"
    dispatcher.stop()


def test_pages_are_bounded_in_bytes_but_hold_at_least_one_message(store):
    big = '"' + "x" * 1000 + '"'  # 1,002 bytes of JSON
    ids = [store.append("c", "t", big).id for _ in range(5)]
    page = store.read_after("c", None, 0, 100, max_bytes=2500)
    assert [m.id for m in page] == ids[:3], "the third starts before 2,500 bytes are spent"
    assert page.more
    assert [m.id for m in store.read_after("c", None, 0, 100, max_bytes=10)] == ids[:1]
    rest = store.read_after("c", None, ids[2], 100, max_bytes=2500)
    assert [m.id for m in rest] == ids[3:] and not rest.more
    full = store.read_after("c", None, 0, 5)
    assert len(full) == 5 and full.more, "as many as the limit: there may be more"
    assert [m.id for m in store.read_new(ids[0], 100, max_bytes=1500)] == ids[1:3]
    assert not store.read_after("c", None, ids[-1], 100).more


def test_append_many_stores_all_in_one_transaction_ids_in_list_order(store):
    from realtime.store import NewMessage

    batch = [NewMessage("b", "t", str(n)) for n in range(1500)]  # more than one INSERT of many values
    stored = store.append_many(batch)
    assert [m.data_json for m in stored] == [str(n) for n in range(1500)]
    assert [m.id for m in stored] == sorted(m.id for m in stored)
    assert [(m.id, m.data_json) for m in store.read_after("b", None, 0, 2000)] == [(m.id, m.data_json) for m in stored]


def test_an_outbox_publish_as_the_first_call_on_sqlite_never_waits_on_its_own_transaction(tmp_path):
    """Issue 19: the schema was made at the first call, on another connection, which waited for
    the write lock the caller's own transaction held, and the caller got a 503 after 5 s."""
    from sqlalchemy import Column, Integer, MetaData, Table, insert

    from app import create_app

    app = create_app({"TESTING": True, "SECRET_KEY": "s", "DATABASE_URL": f"sqlite:///{tmp_path / 'first.sqlite3'}",
                      "JOBS_EMBEDDED": False})
    realtime = app.extensions["realtime"]
    orders = Table("orders", MetaData(), Column("id", Integer, primary_key=True))
    orders.create(realtime.store.engine)
    try:
        with Session(realtime.store.engine) as session:
            order_id = session.execute(insert(orders).returning(orders.c.id)).scalar_one()  # holds the write lock
            realtime.publish("orders", "created", {"id": order_id}, session=session)
            session.commit()
        assert [m.data for m in realtime.store.read_after("orders", None, 0, 10)] == [{"id": order_id}]
    finally:
        realtime.shutdown()
        app.extensions["database"].dispose()


def test_a_write_waiting_on_the_callers_own_sqlite_transaction_says_so(tmp_path):
    from common.database import DatabaseUnavailable

    db = Database(f"sqlite:///{tmp_path / 'own.sqlite3'}", statement_timeout_s=0.2)
    store = MessageStore(db)
    try:
        with Session(store.engine) as session:
            store.append("c", "t", "1", session=session)  # this caller's write lock ...
            with pytest.raises(DatabaseUnavailable, match="session="):
                store.append("c", "t", "2")  # ... which a publish outside its session waits for
            session.rollback()
    finally:
        db.dispose()


def test_an_index_added_since_a_database_was_made_is_created_on_it(store):
    from sqlalchemy import inspect, text

    from realtime.schema import create_schema

    store.db.ensure_schema()
    with store.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_realtime_idempotency_message_id"))  # a database made before issue 17
    create_schema(store.engine)
    with store.engine.connect() as conn:
        names = {index["name"] for index in inspect(conn).get_indexes("realtime_idempotency")}
    assert "ix_realtime_idempotency_message_id" in names
