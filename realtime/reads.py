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
from datetime import datetime, timezone
from typing import Any, Iterator, Mapping, Sequence

from sqlalchemy import Engine, LargeBinary, and_, cast, false, func, literal, or_, select, true

from common.database import as_utc

from .schema import messages, pruned

PAGE_BYTES = 4 * 1024 * 1024  # the most message data one read returns, but for its first message


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
        created_at = self.created_at.astimezone(timezone.utc).isoformat(timespec="microseconds")
        return (
            f'{{"id": {self.id}, "channel": {dump(self.channel)}, "topic": {dump(self.topic)}, '
            f'"data": {self.data_json}, "run_id": {dump(self.run_id)}, '
            f'"created_at": {dump(created_at)}}}'
        )


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
    # Bounded in bytes as well as rows: 500 rows of the largest message would be
    # 250 MB in memory. The database sums the sizes over the page (a window over
    # at most `limit` ids, never their data) and returns the rows that start
    # before the budget is spent, so at least one.
    data_size = (
        func.octet_length(messages.c.data) if engine.dialect.name == "postgresql"
        else func.length(cast(messages.c.data, LargeBinary))
    )
    first = select(messages.c.id, data_size.label("size")).where(*where).order_by(messages.c.id).limit(limit).subquery()
    sized = select(
        first.c.id,
        first.c.size,
        func.sum(first.c.size).over(order_by=first.c.id).label("through"),
        func.count().over().label("rows"),
    ).subquery()
    rows = (
        select(messages, sized.c.rows)
        .join(sized, messages.c.id == sized.c.id)
        .where(sized.c.through - sized.c.size < max_bytes)
    )
    names = None
    if pruned_channel is None and pruned_ranges is None:
        with engine.connect() as conn:
            found = conn.execute(rows.order_by(messages.c.id)).all()
        mark = 0
    else:
        # One row for the mark, joined to the page's rows (or to none: an empty page still knows).
        page = rows.subquery()
        if pruned_ranges is None:
            marks = [func.coalesce(
                select(pruned.c.through_id).where(pruned.c.channel == pruned_channel).scalar_subquery(), 0
            ).label("pruned_through")]
        else:
            # Channel names hold no space: the pruned ones travel as one text in the same snapshot.
            joined = (func.string_agg if engine.dialect.name == "postgresql" else func.group_concat)(
                pruned.c.channel, literal(" ")
            )
            where = pruned_ranges.pruned_where()
            marks = [
                func.coalesce(select(func.max(pruned.c.through_id)).where(where).scalar_subquery(), 0)
                .label("pruned_through"),
                select(joined).where(where).scalar_subquery().label("pruned_channels"),
            ]
        mark_of = select(*marks).subquery()
        query = (
            select(mark_of, page)
            .select_from(mark_of.outerjoin(page, true()))
            .order_by(page.c.id)
        )
        with engine.connect() as conn:
            found = conn.execute(query).all()
        mark = found[0].pruned_through if found else 0
        if pruned_ranges is not None and found and found[0].pruned_channels:
            names = tuple(sorted(found[0].pruned_channels.split(" ")))
        found = [row for row in found if row.id is not None]
    # Full in rows (more may follow), or cut short by the byte budget.
    more = bool(found) and (found[0].rows >= limit or len(found) < found[0].rows)
    return Page(tuple(message_from(row) for row in found), more, mark, names or ())
