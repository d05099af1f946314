"""Where readers may go: holes in the ids, and which transactions may still fill them.

What every reader relies on: **a reader never moves past an id that may still
commit on a channel it serves.** Then "give me what comes after cursor N"
never skips a late commit.

- SQLite has one writer at a time, and `AUTOINCREMENT` ids commit in order:
  no holes to wait for.
- PostgreSQL hands out sequence values without waiting for commits: with two
  concurrent writers, id 11 can commit before id 10. Writers do not queue for
  that (a lock held until commit would make commits run one at a time).
  Instead each writer declares, before it draws an id, a *write intent* on its
  channel: a shared advisory lock keyed by the channel's hash (schema.py),
  held until its transaction ends. A reader that finds a hole below a
  committed id asks `pg_locks` which transactions are in flight and on which
  channels (a `WriterProbe` snapshot), and holds back only the messages of
  those channels, until those transactions end (dispatch.py). A transaction
  that publishes on channel A, however long it stays open, never delays B.
- A transaction that wrote to the table without an intent (by hand, in
  psql) may have drawn an id for any channel: it holds back every channel.
  The pruner declares that it draws no ids, and holds back none.

Snapshots are shared by everything in the process that waits (the dispatcher,
history reads, streams opening as a worker starts), taken at most as often as
the waiters need, and backing off as a wait grows. A wait longer than a second
is logged once per blocking transaction, with its backend pid, and shows in
`realtime_visibility_wait_seconds`.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from sqlalchemy import Engine, text

from . import metrics
from .schema import INTENT, NO_NEW_IDS, SEQUENCE

log = logging.getLogger(__name__)

STALL_REPORT_S = 1.0  # a wait on one transaction longer than this is logged and counted

_PROBE = text(
    "SELECT virtualtransaction, pid, locktype, classid::bigint AS space, objid::bigint AS key FROM pg_locks"
    " WHERE pid IS DISTINCT FROM pg_backend_pid()"  # NULL: a prepared transaction, which blocks too
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    " AND ((locktype = 'relation' AND relation = CAST('realtime_messages' AS regclass) AND mode = 'RowExclusiveLock')"
    f" OR (locktype = 'advisory' AND classid IN ({INTENT}, {NO_NEW_IDS}) AND objsubid = 2))"
)
LAST_DRAWN = text(f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {SEQUENCE}")


@dataclass(frozen=True)
class Writer:
    """A transaction in flight that may still commit messages."""

    vxid: str  # its virtual transaction id, as pg_locks names it
    pid: int | None  # its backend (None: a prepared transaction)
    keys: frozenset[int] | None  # the channels' intent keys; None: any channel

    def may_write(self, key: int) -> bool:
        return self.keys is None or key in self.keys


@dataclass(frozen=True)
class Writers:
    """The writers in flight as one look at `pg_locks` saw them (`look`: the looks' count when it started)."""

    look: int
    by_vxid: Mapping[str, Writer]

    def __iter__(self):
        return iter(self.by_vxid.values())

    def __bool__(self) -> bool:
        return bool(self.by_vxid)

    def running(self, vxid: str) -> bool:
        return vxid in self.by_vxid


NO_WRITERS = Writers(0, {})


class WriterProbe:
    """`pg_locks`, looked at once for every waiter of the process that can share the look."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine = engine
        self.clock = clock
        self._lock = threading.Lock()
        self._latest = NO_WRITERS
        self._looks = 0  # looks started
        self._first_seen: dict[str, float] = {}
        self._reported: set[str] = set()

    def snapshot(self) -> Writers:
        """The writers in flight, from a look that started after this call did.

        Callers asking together share one look: whoever waited for the lock while
        another's look ran takes that one, when it started after the call."""
        return self.newer_than(Writers(self._looks, {}))

    def newer_than(self, seen: Writers) -> Writers:
        """The writers in flight, from a look that started after the look `seen` came from."""
        with self._lock:
            if self._latest.look <= seen.look:
                self._looks += 1
                self._latest = self._look(self._looks)
            return self._latest

    def _look(self, number: int) -> Writers:
        started = self.clock()
        with self.engine.connect() as conn:
            rows = conn.execute(_PROBE).all()
        found: dict[str, dict] = {}
        for row in rows:
            entry = found.setdefault(row.virtualtransaction, {"pid": row.pid, "keys": set(), "quiet": False})
            if row.locktype == "advisory":
                if row.space == INTENT:
                    entry["keys"].add(row.key)
                else:
                    entry["quiet"] = True
        writers = {}
        for vxid, entry in found.items():
            if entry["keys"]:
                writers[vxid] = Writer(vxid, entry["pid"], frozenset(entry["keys"]))
            elif not entry["quiet"]:
                writers[vxid] = Writer(vxid, entry["pid"], None)
        self._first_seen = {vxid: self._first_seen.get(vxid, started) for vxid in writers}
        self._reported &= writers.keys()
        return Writers(number, writers)

    def waiting_on(self, writers: Iterable[Writer], what: str) -> None:
        """Say that `what` waits on these writers: a wait past STALL_REPORT_S is logged once and counted."""
        now = self.clock()
        longest = 0.0
        for writer in writers:
            waited = now - self._first_seen.get(writer.vxid, now)
            longest = max(longest, waited)
            if waited >= STALL_REPORT_S and writer.vxid not in self._reported:
                self._reported.add(writer.vxid)
                metrics.VISIBILITY_STALLS.inc()
                scope = "every channel" if writer.keys is None else f"{len(writer.keys)} channel(s)"
                log.warning(
                    "%s waits for the transaction of backend pid %s (it may still write %s), open for %.1f s; "
                    "keep transactions that publish short, or set idle_in_transaction_session_timeout",
                    what, writer.pid, scope, waited,
                    extra={"blocking_pid": writer.pid, "waited_s": round(waited, 3)},
                )
        metrics.VISIBILITY_WAIT.set(longest)


def backoff(waited_s: float) -> float:
    """How long to wait before looking again, after waiting `waited_s`: 2 ms at first, 250 ms at most.

    A transaction that publishes ends within milliseconds; one that stays open
    for seconds is not worth a look every 2 ms (and its commit wakes the
    readers through the change feed anyway)."""
    return min(0.25, max(0.002, waited_s / 8))
