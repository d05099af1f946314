"""Reading messages back: pages bounded in rows and in bytes, and what a page knows.

A page is a value (`Page`): its messages, oldest first; whether more may follow;
and, for a channel's page, how far the channel was pruned *in the same snapshot
as its rows*, so the reader of any page, not only the first, knows whether
messages right after its cursor were pruned before it looked (docs/protocol.md
§6's `history_truncated`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping, Sequence

from sqlalchemy import Engine, Integer, LargeBinary, Select, and_, bindparam, cast, false, func, literal, or_, select, true

from common.database import as_utc

from .schema import messages, pruned

PAGE_BYTES = 4 * 1024 * 1024  # the most message data one read returns, but for its first message
#: The columns of a page's rows, in this order (run_page reads them by position).
PAGE_COLUMNS = ("id", "channel", "topic", "data", "run_id", "created_at", "text_stream", "text_seq")


@dataclass(frozen=True)
class NewMessage:
    """A message to store: its data already JSON text (Realtime.publish_many checks and encodes it)."""

    channel: str
    topic: str
    data_json: str
    run_id: str | None = None
    text_stream: str | None = None  # a text stream's message (text_streams.py): its id and seq
    text_seq: int | None = None


@dataclass(frozen=True)
class Message:
    """A stored message, as every layer above the store sees it."""

    id: int
    channel: str
    topic: str
    data_json: str
    run_id: str | None
    created_at: datetime
    replayed: bool = False  # an Idempotency-Key repeat: stored by an earlier publish
    text_stream: str | None = None  # a text stream's message (text_streams.py): its id and seq
    text_seq: int | None = None

    @property
    def data(self) -> Any:
        return json.loads(self.data_json)

    def envelope(self) -> dict[str, Any]:
        return json.loads(self.envelope_json())

    def envelope_json(self) -> str:
        """The envelope of docs/protocol.md §5, built around the stored data text without re-encoding it."""
        dump = json.dumps
        created_at = _utc_text(self.created_at)
        return (
            f'{{"id": {self.id}, "channel": {dump(self.channel)}, "topic": {dump(self.topic)}, '
            f'"data": {self.data_json}, "run_id": {dump(self.run_id)}, '
            f'"created_at": {dump(created_at)}}}'
        )


@lru_cache(maxsize=1024)
def _utc_text(created_at: datetime) -> str:
    """A creation time as the envelope writes it. Kept for the times seen last: the messages of
    one batch share theirs, and the dispatcher writes an envelope for every message it delivers."""
    return created_at.astimezone(timezone.utc).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Page:
    """Messages of one read, oldest first.

    `more`: the read stopped at its row or byte limit, so the next read (after
    the last id) may find more. `pruned_through`: for a channel's page, the
    channel's highest pruned id as of the same snapshot (0: never pruned); for
    a page of several channels (`Ranges`), the highest mark of those pruned past
    where they start, and `pruned_channels` names them.
    """

    messages: tuple[Message, ...] = ()
    more: bool = False
    pruned_through: int = 0
    pruned_channels: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[Message]:
        return iter(self.messages)

    def __len__(self) -> int:
        return len(self.messages)

    def __getitem__(self, index: int) -> Message:
        return self.messages[index]

    def up_to(self, through: int) -> Page:
        """Its messages up to id `through`; what follows them is not this page's to tell (more=False)."""
        if not self.messages or self.messages[-1].id <= through:
            return self
        return replace(self, messages=tuple(m for m in self.messages if m.id <= through), more=False)


@dataclass(frozen=True)
class Ranges:
    """What one read of several channels covers (docs/protocol.md §12): for each channel, its topics
    (None: all) and the id after which it starts. Usually every channel starts at the stream's one
    cursor; a channel added with `since` starts earlier until the stream passes its start."""

    items: tuple[tuple[str, "tuple[str, ...] | None", int], ...]  # (channel, topics, after id), by channel

    @classmethod
    def of(cls, scope: Mapping[str, "Sequence[str] | None"], starts: Mapping[str, int]) -> Ranges:
        return cls(tuple(
            (channel, None if topics is None else tuple(topics), starts[channel])
            for channel, topics in sorted(scope.items())
        ))

    @property
    def channels(self) -> tuple[str, ...]:
        return tuple(channel for channel, _, _ in self.items)

    @property
    def first(self) -> int:
        """The lowest start: nothing at or below it is read."""
        return min(after for _, _, after in self.items)

    def after(self, last_id: int) -> Ranges:
        """Each channel from `last_id` on, or from its own start if later: the next page after a page."""
        if last_id <= self.first:
            return self
        return Ranges(tuple((channel, topics, max(after, last_id)) for channel, topics, after in self.items))

    def groups(self) -> dict[tuple["tuple[str, ...] | None", int], list[str]]:
        """The channels by (topics, start): one SQL condition each, usually one in all."""
        grouped: dict[tuple[tuple[str, ...] | None, int], list[str]] = {}
        for channel, topics, after in self.items:
            grouped.setdefault((topics, after), []).append(channel)
        return grouped

    def where(self) -> Any:
        """The messages in these ranges, as one condition (one read for all the channels)."""
        conditions = []
        for (topics, after), channels in self.groups().items():
            condition = [messages.c.channel.in_(channels), messages.c.id > after]
            if topics is not None:
                condition.append(messages.c.topic.in_(topics))
            conditions.append(and_(*condition))
        return and_(messages.c.id > self.first, or_(*conditions))

    def pruned_where(self) -> Any:
        """The prune marks past where their channel starts: messages of the range that are gone.
        A channel read from its beginning (start 0) lost nothing it could have had."""
        conditions = [
            and_(pruned.c.channel.in_(channels), pruned.c.through_id > after)
            for (_, after), channels in self.groups().items() if after > 0
        ]
        return or_(*conditions) if conditions else false()


def message_from(row: Any) -> Message:
    return Message(
        row.id, row.channel, row.topic, row.data, row.run_id, as_utc(row.created_at),
        text_stream=row.text_stream, text_seq=row.text_seq,
    )


def read_page(
    engine: Engine, where: Sequence[Any], limit: int, max_bytes: int, *, pruned_channel: str | None = None,
    pruned_ranges: Ranges | None = None,
) -> Page:
    """The messages matching `where`, in id order: at most `limit`, and no more than `max_bytes`
    of data but the first. With `pruned_channel`, the page also carries that channel's prune
    mark, read by the same statement (one snapshot, even when no row matches); with
    `pruned_ranges`, the marks of the channels pruned past their start, and their names."""
    query = page_query(
        where, postgres=engine.dialect.name == "postgresql", pruned_channel=pruned_channel, pruned_ranges=pruned_ranges
    )
    marks = "ranges" if pruned_ranges is not None else "channel" if pruned_channel is not None else None
    return run_page(engine, query, {}, limit, max_bytes, marks=marks)


def page_query(
    where: Sequence[Any], *, postgres: bool, pruned_channel: Any = None, pruned_ranges: Ranges | None = None
) -> Select:
    """`read_page`'s statement, its limits the bound parameters `page_limit` and `page_bytes`
    (`run_page` binds them). A statement of bound parameters only is built once and kept
    (queries.py): building one costs more than the database takes to answer it."""
    # Bounded in bytes as well as rows: 500 rows of the largest message would be
    # 250 MB in memory. The database sums the sizes over the page (a window over
    # at most `limit` rows; PostgreSQL reads a large value's size without
    # detoasting it) and returns the rows that start before the budget is spent,
    # so at least one. One pass over the page's rows: no join back to the table,
    # which the planner answered with a scan of the whole table.
    data_size = func.octet_length(messages.c.data) if postgres else func.length(cast(messages.c.data, LargeBinary))
    columns = [messages.c[name] for name in PAGE_COLUMNS]
    first = (
        select(*columns, data_size.label("size")).where(*where).order_by(messages.c.id)
        .limit(bindparam("page_limit", type_=Integer)).subquery()
    )
    sized = select(
        *(first.c[name] for name in PAGE_COLUMNS),
        (func.sum(first.c.size).over(order_by=first.c.id) - first.c.size).label("before"),
        func.count().over().label("rows"),
    ).subquery()
    rows = (
        select(*(sized.c[name] for name in PAGE_COLUMNS), sized.c.rows)
        .where(sized.c.before < bindparam("page_bytes", type_=Integer))
    )
    if pruned_channel is None and pruned_ranges is None:
        return rows.order_by(sized.c.id)
    # One row for the mark, joined to the page's rows (or to none: an empty page still knows).
    page = rows.subquery()
    if pruned_ranges is None:
        marks = [func.coalesce(
            select(pruned.c.through_id).where(pruned.c.channel == pruned_channel).scalar_subquery(), 0
        ).label("pruned_through")]
    else:
        # Channel names hold no space: the pruned ones travel as one text in the same snapshot.
        joined = (func.string_agg if postgres else func.group_concat)(pruned.c.channel, literal(" "))
        where = pruned_ranges.pruned_where()
        marks = [
            func.coalesce(select(func.max(pruned.c.through_id)).where(where).scalar_subquery(), 0)
            .label("pruned_through"),
            select(joined).where(where).scalar_subquery().label("pruned_channels"),
        ]
    mark_of = select(*marks).subquery()
    return select(mark_of, page).select_from(mark_of.outerjoin(page, true())).order_by(page.c.id)


def run_page(
    engine: Engine, query: Select, params: Mapping[str, Any], limit: int, max_bytes: int, *, marks: str | None
) -> Page:
    """The page `query` (from `page_query`) reads with `params`; `marks`: None, or the prune marks it
    carries, "channel" (a channel's mark) or "ranges" (the highest mark and the pruned channels' names)."""
    with engine.connect() as conn:
        found = conn.execute(query, {**params, "page_limit": limit, "page_bytes": max_bytes}).all()
    mark, names = 0, ()
    if marks is not None:
        mark = found[0].pruned_through if found else 0
        if marks == "ranges" and found and found[0].pruned_channels:
            names = tuple(sorted(found[0].pruned_channels.split(" ")))
        found = [row for row in found if row.id is not None]
    # Full in rows (more may follow), or cut short by the byte budget.
    more = bool(found) and (found[0].rows >= limit or len(found) < found[0].rows)
    # By position, PAGE_COLUMNS' order after the marks: the dispatcher reads every new row here,
    # and a row's attributes by name cost twice as much.
    first = {None: 0, "channel": 1, "ranges": 2}[marks]
    return Page(tuple(
        Message(id_, channel, topic, data, run_id, as_utc(created_at), text_stream=stream, text_seq=seq)
        for id_, channel, topic, data, run_id, created_at, stream, seq in (row[first:first + 8] for row in found)
    ), more, mark, names)
