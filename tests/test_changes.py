"""Change feeds: "look again" signals, polled for SQLite, LISTEN/NOTIFY on a real PostgreSQL."""
from __future__ import annotations

import threading

import psycopg
import pytest
from sqlalchemy.engine import make_url

from realtime.changes import PollingChangeFeed, PostgresChangeFeed

CHANNEL = "rt_test_changes"


# -- polling (SQLite) ---------------------------------------------------------------


def test_a_new_polling_feed_says_look_at_once_then_waits_for_the_interval():
    feed = PollingChangeFeed(poll_s=3600)
    assert feed.wait(timeout=0) is True  # messages may exist from before the process started
    assert feed.wait(timeout=0) is False


def test_poke_makes_wait_return_true_once():
    feed = PollingChangeFeed(poll_s=3600)
    feed.wait(timeout=0)
    feed.poke()
    assert feed.wait(timeout=0) is True
    assert feed.wait(timeout=0) is False


def test_wait_returns_true_whenever_the_poll_interval_has_passed():
    feed = PollingChangeFeed(poll_s=0)
    assert [feed.wait(timeout=0) for _ in range(3)] == [True, True, True]


@pytest.mark.parametrize("wake", ["poke", "close"])
def test_poke_or_close_from_another_thread_wakes_a_waiter(wake):
    feed = PollingChangeFeed(poll_s=3600)
    feed.wait(timeout=0)
    results: list[bool] = []
    waiter = threading.Thread(target=lambda: results.append(feed.wait(timeout=3600)), daemon=True)
    waiter.start()
    getattr(feed, wake)()
    waiter.join(timeout=10)  # a hang guard, not a timing assertion
    assert not waiter.is_alive(), f"{wake}() did not wake the waiting thread"
    assert results == [True]


# -- PostgreSQL LISTEN/NOTIFY -------------------------------------------------------


@pytest.fixture
def libpq_url(postgres_url) -> str:
    return postgres_url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture
def pg_feed(postgres_url):
    feed = PostgresChangeFeed(make_url(postgres_url), CHANNEL, notify_url=make_url(postgres_url))
    yield feed
    feed.close()


def _notify(libpq_url: str) -> None:
    with psycopg.connect(libpq_url, autocommit=True) as conn:
        conn.execute(f"NOTIFY {CHANNEL}")


def _kill_listener(libpq_url: str) -> None:
    with psycopg.connect(libpq_url, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN%' AND datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    assert killed == [(True,)], killed


@pytest.mark.postgres
def test_first_wait_connects_and_says_look(pg_feed):
    # Notifications sent while nobody listened are lost: the caller must read once.
    assert pg_feed.wait(timeout=0) is True


@pytest.mark.postgres
def test_a_notify_from_another_connection_wakes_the_feed(pg_feed, libpq_url):
    pg_feed.wait(timeout=0)
    _notify(libpq_url)
    assert pg_feed.wait(timeout=10) is True


@pytest.mark.postgres
def test_without_a_notify_wait_returns_false(pg_feed):
    pg_feed.wait(timeout=0)
    assert pg_feed.wait(timeout=0.05) is False


@pytest.mark.postgres
def test_a_killed_listen_connection_is_replaced_and_notifies_still_arrive(pg_feed, libpq_url):
    pg_feed.wait(timeout=0)
    _kill_listener(libpq_url)
    assert pg_feed.wait(timeout=10) is True  # connection lost: notifies may have been missed, look
    for _ in range(3):  # reconnecting says "look" too; once listening again, an idle wait is False
        if pg_feed.wait(timeout=0.05) is False:
            break
    else:
        pytest.fail("the feed never settled back into listening after its connection was killed")
    _notify(libpq_url)
    assert pg_feed.wait(timeout=10) is True


def test_an_unreachable_database_makes_wait_say_look_instead_of_raising():
    nowhere = make_url("postgresql+psycopg://postgres@127.0.0.1:1/nowhere")
    feed = PostgresChangeFeed(nowhere, CHANNEL, notify_url=nowhere)
    try:
        assert feed.wait(timeout=0) is True
    finally:
        feed.close()


@pytest.mark.postgres
def test_pokes_reach_every_listener_as_few_notifies(postgres_url, libpq_url):
    """A publishing process pokes its feed after each commit; other processes hear a NOTIFY,
    one for a burst of pokes, not one per message."""
    url = make_url(postgres_url)
    feed = PostgresChangeFeed(url, CHANNEL, notify_url=url)
    with psycopg.connect(libpq_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        pokers = [threading.Thread(target=feed.poke) for _ in range(50)]
        for poker in pokers:
            poker.start()
        for poker in pokers:
            poker.join(30)
        heard = list(listener.notifies(timeout=10, stop_after=1))  # the timeout only guards a hang
        heard += list(listener.notifies(timeout=0.5))
    feed.close()
    assert 1 <= len(heard) < 50, f"{len(heard)} NOTIFYs for 50 pokes"
