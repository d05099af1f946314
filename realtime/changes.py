"""Change feeds: how a process learns that *some* message was appended.

A feed carries no messages, only "look again": the dispatcher then reads the
new rows itself, once for all its streams. Two implementations:

- `PostgresChangeFeed`: one LISTEN connection per process. After its own
  commits a process sends one NOTIFY (`Notifier`), which PostgreSQL delivers
  to every listener, whichever process or machine wrote. psycopg >= 3.1.14 waits on the
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

from common.greenlets import gevent_hub, set_event

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
        set_event(self._poked, self._hub)

    def close(self) -> None:
        self._poked.set()


def _conninfo(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class Notifier:
    """Sends "look again" to the other processes, off the publisher's path.

    A NOTIFY inside the publishing transaction would take PostgreSQL's notify
    queue lock at commit and hold it through the commit, so concurrent
    publishers would commit one at a time again. Instead each process, after
    its own commits, sends one NOTIFY of its own from a background thread,
    however many messages committed meanwhile, and at most one per
    `spacing_s` while it publishes fast (a busy publisher would otherwise send
    one NOTIFY per message, each a commit of its own).
    """

    def __init__(self, conninfo: str, channel: str, *, spacing_s: float = 0.01) -> None:
        self._conninfo = conninfo
        self._channel = channel
        self._conn: psycopg.Connection | None = None
        self.spacing_s = spacing_s
        self._wanted = threading.Event()
        self._hub = gevent_hub()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def for_url(cls, url: URL, channel: str) -> Notifier:
        return cls(_conninfo(url), channel)

    def poke(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._closed:
                    self._thread = threading.Thread(target=self._run, name="realtime-notifier", daemon=True)
                    self._thread.start()
        set_event(self._wanted, self._hub)

    def close(self) -> None:
        """Send what was asked, then stop the thread and close its connection."""
        with self._lock:
            self._closed = True
            thread = self._thread
        if thread is None:
            return
        set_event(self._wanted, self._hub)
        thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closed:
                self._disconnect()
                return
            sent = time.monotonic()
            try:
                self._send()
            except psycopg.Error as exc:  # the safety poll covers what a lost NOTIFY would have said
                log.warning("NOTIFY failed (%s); listeners will look at their next poll", type(exc).__name__)
                self._disconnect()
            threading.Event().wait(max(0.0, sent + self.spacing_s - time.monotonic()))

    def _send(self) -> None:
        # Its own connection, kept open: a NOTIFY costs one short round trip.
        if self._conn is None:
            self._conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=3)
        self._conn.execute(f"NOTIFY {self._channel}")

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class PostgresChangeFeed:
    """LISTEN on its own connection, plus a safety poll.

    The connection may be lost (a restart, a pooler in between, an idle
    timeout in a firewall): the feed then reconnects by itself, and meanwhile
    `wait` still says "look" every `safety_poll_s`, so new messages reach the
    streams within that time whatever happens to LISTEN. `listen_url` is a
    direct connection (REALTIME_LISTEN_URL): LISTEN does not work through
    PgBouncer in transaction mode.
    """

    def __init__(self, listen_url: URL, channel: str, *, notify_url: URL, safety_poll_s: float = 1.0) -> None:
        self._conninfo = _conninfo(listen_url)
        self._channel = channel
        self._notifier = Notifier.for_url(notify_url, channel)
        self._conn: psycopg.Connection | None = None
        self.safety_poll_s = safety_poll_s
        self._next_look = time.monotonic()

    @property
    def listening(self) -> bool:
        return self._conn is not None

    def wait(self, timeout: float) -> bool:
        if self._conn is None:
            if not self._connect():
                threading.Event().wait(min(timeout, 1.0))
            # Listening (again) from now on: what committed before was heard by nobody, so look.
            return self._look_now()
        try:
            wait_s = max(0.0, min(timeout, self._next_look - time.monotonic()))
            woke = bool(list(self._conn.notifies(timeout=wait_s, stop_after=1)))
            # Coalesce a burst: one read covers every NOTIFY already queued.
            for _ in self._conn.notifies(timeout=0):
                pass
        except psycopg.Error as exc:
            log.warning("LISTEN connection lost (%s); reconnecting", type(exc).__name__)
            self._disconnect()
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
            self._disconnect()
            return False

    def _look_now(self) -> bool:
        self._next_look = time.monotonic() + self.safety_poll_s
        return True

    def poke(self) -> None:
        # Every process, this one included, hears it on its LISTEN connection.
        self._notifier.poke()

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """For good: by the thread that waits, once it no longer will."""
        self._disconnect()
        self._notifier.close()
