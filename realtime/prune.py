"""Retention: expired messages deleted a short batch at a time, by one pruner at a time.

Messages go oldest first, as a *prefix of ids*: every id up to the newest
expired message. A prefix, so that one number per channel, its prune mark
(`realtime_pruned.through_id`, the highest id pruned from it), says exactly
which of its messages are gone: a cursor below the mark lost history
(`history_truncated`, stream.py), one at or above it lost nothing.

- **Batches.** A round deletes `batch_size` ids per transaction, oldest first,
  until nothing expired remains or its `round_s` is spent. One DELETE of a
  backlog (a pruner down for a day, a burst of publishes) runs past the
  statement timeout (common/database.py), is cancelled at every try, and the
  table grows without bound (issue 17, item 5). Each batch deletes, in one
  transaction, the messages, raises their channels' marks and deletes their
  Idempotency-Keys: a reader's snapshot sees marks and deletions together
  (reads.py reads a page and its channel's mark in one statement), and a key
  goes with its message, chosen by message id rather than by age, so that a
  repeated publish never finds a key whose message is gone. On PostgreSQL a
  batch first declares that it draws no ids (NO_NEW_IDS), so live readers
  never wait for it (visibility.py).
- **One pruner at a time.** Every process prunes on its schedule. On
  PostgreSQL every transaction of a round tries `pg_try_advisory_xact_lock`
  (PRUNER), and a round that finds it taken ends at once: another process is
  pruning. The lock is transaction-scoped, not a session lock held for the
  round: behind PgBouncer in transaction mode (deploy/pgbouncer.ini) a session
  is not one server connection, and its lock would stay behind on whichever
  connection took it. So two rounds started together may hand over between
  batches, but never run two batches at once. On SQLite the write lock already
  serializes batches; a lock per process keeps a second round of the same
  process from starting.
- **Marks do not pile up.** A channel with retained messages keeps its mark.
  A channel with none left (a run long finished) needs its mark only for
  clients that still hold a cursor of it, so that one below the mark hears
  `history_truncated` instead of resuming silently. Its mark is forgotten once
  it has stood a whole retention: by then a cursor below it is more than twice
  the retention old (its message was published a retention at least before
  the mark was set). Such a cursor, on a channel that stayed silent all that
  time, resumes without a reset: `resolve_cursor`'s epoch and `last_id` checks
  do not catch it (it is a real id of this database, below the newest). That
  is the price of a bounded table, as Kafka's `delete.retention.ms` bounds how
  long a compacted topic keeps tombstones for consumers that lag. The table
  then holds the channels with retained messages, and those pruned in the last
  two retentions at most. No timestamp per mark says how long it has stood:
  a checkpoint in `realtime_meta` does, the highest pruned id and when it was
  read. Once the checkpoint is a retention old, marks at or below its id whose
  channel has no message left go (a page of channels per transaction, one
  pass), and the checkpoint moves to now.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Callable

from sqlalchemy import case, delete, exists, func, select, text
from sqlalchemy.orm import Session

from common.database import Database, database_call, upsert, utcnow, write_session

from .schema import NO_NEW_IDS, PRUNER, idempotency, messages, meta, pruned

# Both at once, first thing in every transaction of a round (PostgreSQL).
_TURN = text(f"SELECT pg_advisory_xact_lock_shared({NO_NEW_IDS}, 0), pg_try_advisory_xact_lock({PRUNER}, 0)")
_CHECKPOINT = "marks_checkpoint"  # realtime_meta: "<highest pruned id> <when, ISO 8601>"


@dataclass(frozen=True)
class PruneRound:
    """What one round did."""

    removed: int = 0  # messages deleted
    batches: int = 0  # transactions that deleted some
    forgotten: int = 0  # prune marks dropped (channels with no message left, see the module docstring)
    behind: bool = False  # expired messages remain: the round's time ran out, or it was stopped
    busy: bool = False  # it ended because another pruner was at work


@dataclass(frozen=True)
class _Checkpoint:
    through: int  # the highest id pruned...
    at: datetime  # ...when this was read


class Pruner:
    """Deletes a database's expired messages, a batch per transaction (the module docstring says how)."""

    batch_size = 5000  # messages per transaction, and marks per page when they are forgotten
    round_s = 30.0  # a round ends after this long; Realtime.prune starts another while it is behind

    def __init__(
        self, db: Database, *, now: Callable[[], datetime] = utcnow, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.db = db
        self.engine = db.engine
        self.is_postgres = self.engine.dialect.name == "postgresql"
        self._now = now
        self._clock = clock  # monotonic: the round's time
        self._running = threading.Lock()

    def run(self, max_age: timedelta, *, stop: threading.Event | None = None) -> PruneRound:
        """One round: delete the messages older than `max_age`, then forget the marks that have
        stood a retention. A round of this process that is already running makes this one a no-op."""
        if not self._running.acquire(blocking=False):
            return PruneRound(busy=True)
        try:
            return self._round(max_age, stop)
        finally:
            self._running.release()

    def _round(self, max_age: timedelta, stop: threading.Event | None) -> PruneRound:
        deadline = self._clock() + self.round_s

        def must_end() -> bool:
            return self._clock() >= deadline or (stop is not None and stop.is_set())

        now = self._now()
        removed = batches = 0
        through = self._newest_expired(now - max_age)
        after = 0  # every id up to here is gone
        while through is not None and after < through:
            if must_end():
                return PruneRound(removed, batches, behind=True)
            deleted = self._delete_batch(after, through)
            if deleted is None:
                return PruneRound(removed, batches, busy=True)
            count, after = deleted
            removed += count
            if count:
                batches += 1
            if count < self.batch_size:
                break
        forgotten = 0
        checkpoint = self._checkpoint()
        if checkpoint is not None and now - checkpoint.at < max_age:
            return PruneRound(removed, batches)
        if checkpoint is not None:  # (none before the first round: no mark has stood a retention yet)
            channel: str | None = ""  # the marks, a page at a time in channel order, in one pass
            while channel is not None:
                if must_end():
                    return PruneRound(removed, batches, forgotten)  # the pass starts over next round
                page = self._forget_marks(channel, checkpoint.through)
                if page is None:
                    return PruneRound(removed, batches, forgotten, busy=True)
                count, channel = page
                forgotten += count
        if not self._move_checkpoint(now):
            return PruneRound(removed, batches, forgotten, busy=True)
        return PruneRound(removed, batches, forgotten)

    # -- messages -----------------------------------------------------------

    @database_call
    def _newest_expired(self, cutoff: datetime) -> int | None:
        """The id of the newest message created before `cutoff`: the round deletes every id up to it.

        One step down the created_at index. The largest *id* created before the
        cutoff would visit every expired row, which with a backlog is the
        statement timeout again. The two differ only by clock skew between
        publishers, and only by which round deletes a message."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(messages.c.id).where(messages.c.created_at < cutoff)
                .order_by(messages.c.created_at.desc(), messages.c.id.desc()).limit(1)
            ).scalar()

    @database_call
    def _delete_batch(self, after: int, through: int) -> tuple[int, int] | None:
        """Delete the oldest `batch_size` messages with ids in (after, through], their channels'
        marks raised and their keys deleted with them: (how many, the last id of the batch),
        or None when another pruner is at work."""
        with write_session(self.engine) as session:
            if not self._take_turn(session):
                return None
            first = (
                select(messages.c.id).where(messages.c.id > after, messages.c.id <= through)
                .order_by(messages.c.id).limit(self.batch_size).subquery()
            )
            last = session.execute(select(func.max(first.c.id))).scalar()
            if last is None:
                return 0, through
            in_batch = (messages.c.id > after) & (messages.c.id <= last)
            marks = upsert(self.engine, pruned).from_select(
                ["channel", "through_id"],
                select(messages.c.channel, func.max(messages.c.id)).where(in_batch).group_by(messages.c.channel),
            )
            session.execute(marks.on_conflict_do_update(
                index_elements=[pruned.c.channel],
                set_={"through_id": case(
                    (marks.excluded.through_id > pruned.c.through_id, marks.excluded.through_id),
                    else_=pruned.c.through_id,
                )},
            ))
            session.execute(
                delete(idempotency).where(idempotency.c.message_id > after, idempotency.c.message_id <= last)
            )
            return session.execute(delete(messages).where(in_batch)).rowcount, last

    # -- marks --------------------------------------------------------------

    @database_call
    def _checkpoint(self) -> _Checkpoint | None:
        """The checkpoint, or None before the first round."""
        with self.engine.connect() as conn:
            value = conn.execute(select(meta.c.value).where(meta.c.key == _CHECKPOINT)).scalar()
        if value is None:
            return None
        through, at = value.split(" ")
        return _Checkpoint(int(through), datetime.fromisoformat(at))

    @database_call
    def _forget_marks(self, after: str, through: int) -> tuple[int, str | None] | None:
        """Of the next `batch_size` marks after channel `after`, drop those at or below `through`
        whose channel has no message left: (how many, the page's last channel or None at the end),
        or None when another pruner is at work."""
        with write_session(self.engine) as session:
            if not self._take_turn(session):
                return None
            channels = session.execute(
                select(pruned.c.channel).where(pruned.c.channel > after)
                .order_by(pruned.c.channel).limit(self.batch_size)
            ).scalars().all()
            gone = session.execute(delete(pruned).where(
                pruned.c.channel.in_(channels),
                pruned.c.through_id <= through,
                ~exists().where(messages.c.channel == pruned.c.channel),
            )).rowcount if channels else 0
            return gone, channels[-1] if len(channels) == self.batch_size else None

    @database_call
    def _move_checkpoint(self, now: datetime) -> bool:
        """The checkpoint becomes (the highest pruned id, now); False when another pruner is at work."""
        with write_session(self.engine) as session:
            if not self._take_turn(session):
                return False
            through = session.execute(select(func.max(pruned.c.through_id))).scalar() or 0
            statement = upsert(self.engine, meta).values(key=_CHECKPOINT, value=f"{through} {now.isoformat()}")
            session.execute(statement.on_conflict_do_update(
                index_elements=[meta.c.key], set_={"value": statement.excluded.value}
            ))
            return True

    def _take_turn(self, session: Session) -> bool:
        """PostgreSQL: say this transaction draws no ids, and take the pruner's lock if it is free."""
        return not self.is_postgres or session.execute(_TURN).one()[1]
