"""Change feeds: how a process learns that *some* message was appended.

A feed carries no messages, only "look again": the dispatcher then reads the
new rows itself, once for all its streams. Two implementations:

- `PostgresChangeFeed`: one LISTEN connection per process. Every append sends
  NOTIFY in its transaction, which PostgreSQL delivers at commit to every
  listener, whichever process or machine wrote. psycopg >= 3.1.14 waits on the
  socket cooperatively under gevent, so this costs a worker nothing while idle.
  A safety poll covers the moments LISTEN is lost.
- `PollingChangeFeed` (SQLite): SQLite cannot notify other processes, so the
  feed wakes up every `poll_s` seconds, and at once when this process appends
  (`poke`). One indexed read per poll per process, however many streams.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

import psycopg
from sqlalchemy.engine import URL

from common.greenlets import gevent_hub, native_thread_ident

log = logging.getLogger(__name__)


class ChangeFeed(Protocol):
    def wait(self, timeout: float) -> bool:
        """Block up to `timeout` s; True when new rows may exist, False when surely not."""

    def poke(self) -> None:
        """This process appended: wake `wait` now. Safe to call from any thread."""

    def close(self) -> None: ...


class PollingChangeFeed:
    def __init__(self, poll_s: float) -> None:
        self.poll_s = poll_s
        self._poked = threading.Event()
        self._hub = gevent_hub()
        self._next_poll = time.monotonic()

    def wait(self, timeout: float) -> bool:
        poked = self._poked.wait(max(0.0, min(timeout, self._next_poll - time.monotonic())))
        if poked:
            # Only what this wait saw: a poke that lands after a timed-out wait
            # stays set and wakes the next one.
            self._poked.clear()
        if poked or time.monotonic() >= self._next_poll:
            # Another process may have written since the last look.
            self._next_poll = time.monotonic() + self.poll_s
            return True
        return False

    def poke(self) -> None:
        hub = self._hub
        if hub is not None and hub.thread_ident != native_thread_ident():
            # Under gevent this Event belongs to the hub's thread; a job on a
            # native thread (jobs/worker.py) must hand the set() over to it.
            hub.loop.run_callback_threadsafe(self._poked.set)
        else:
            self._poked.set()

    def close(self) -> None:
        self._poked.set()


class PostgresChangeFeed:
    """LISTEN on its own connection, plus a safety poll.

    The connection may be lost (a restart, a pooler in between, an idle
    timeout in a firewall): the feed then reconnects by itself, and meanwhile
    `wait` still says "look" every `safety_poll_s`, so new messages reach the
    streams within that time whatever happens to LISTEN. `listen_url` is a
    direct connection (REALTIME_LISTEN_URL): LISTEN does not work through
    PgBouncer in transaction mode.
    """

    def __init__(self, listen_url: URL, channel: str, *, safety_poll_s: float = 1.0) -> None:
        self._conninfo = listen_url.set(drivername="postgresql").render_as_string(hide_password=False)
        self._channel = channel
        self._conn: psycopg.Connection | None = None
        self.safety_poll_s = safety_poll_s
        self._next_look = time.monotonic()

    @property
    def listening(self) -> bool:
        return self._conn is not None

    def wait(self, timeout: float) -> bool:
        if self._conn is None and not self._connect():
            threading.Event().wait(min(timeout, 1.0))
            return self._look_now()
        if self._conn is None:
            return self._look_now()  # notifications sent while we were not listening are lost: look
        try:
            wait_s = max(0.0, min(timeout, self._next_look - time.monotonic()))
            woke = bool(list(self._conn.notifies(timeout=wait_s, stop_after=1)))
            # Coalesce a burst: one read covers every NOTIFY already queued.
            for _ in self._conn.notifies(timeout=0):
                pass
        except psycopg.Error as exc:
            log.warning("LISTEN connection lost (%s); reconnecting", type(exc).__name__)
            self.close()
            return self._look_now()
        if woke or time.monotonic() >= self._next_look:
            return self._look_now()
        return False

    def _connect(self) -> bool:
        try:
            self._conn = psycopg.connect(
                self._conninfo, autocommit=True, connect_timeout=3,
                keepalives=1, keepalives_idle=5, keepalives_interval=2, keepalives_count=3,
            )
            self._conn.execute(f"LISTEN {self._channel}")
            return True
        except psycopg.Error as exc:
            log.warning("cannot LISTEN for new messages (%s); retrying", type(exc).__name__)
            self.close()
            return False

    def _look_now(self) -> bool:
        self._next_look = time.monotonic() + self.safety_poll_s
        return True

    def poke(self) -> None:
        pass  # our own NOTIFY arrives on the LISTEN connection like anyone else's

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
