"""Replay folds a text stream's deltas into its text so far (docs/protocol.md §11).

A live client gets a text stream delta by delta. A client that opens a stream
or reads history later gets, for each text stream in its range, one message
with `text`, the whole text through that message's seq, instead of every
delta: a reload of a page showing a 20,000-token answer gets the answer at
once, not 8,000 frames.

    stored (ids):   12 {seq 0, text ""}  13 {seq 1, delta "Hel"}  15 {seq 2, delta "lo"}  16 {seq 3, end}
    replay after 0:                                                                        16 {seq 3, text "Hello", status}
    replay after 13:                                                                       16 {seq 3, text "Hello", status}

Two steps, both here:
1. The page's SQL leaves out a text stream's message when a later message of
   the same stream is in range (`superseded`): the page's row and byte limits
   count what is sent, and a text stream sits where its last message in range
   sits, whose id is the folded message's cursor. Resuming from that cursor
   continues with the next live delta.
2. `fold` rebuilds each remaining text message's text from the stream's
   messages of the same attempt (from its last seq 0 on, one SELECT for the
   page), applying the client's own rule: only the next seq is appended, so a
   seq already applied (a flush stored twice after a commit whose answer was
   lost) and one that is no next seq (a writer that outlived its attempt) are
   ignored.
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Sequence

from sqlalchemy import Engine, and_, exists, func, not_, or_, select

from common import jsontext

from .reads import Message, Page, message_from
from .schema import messages

def not_superseded(through: Any) -> Any:
    """The page's condition: not a text stream's message followed, in range (up to `through`, an id,
    a bound parameter or None), by another of its stream."""
    later = messages.alias("later")
    condition = [
        later.c.channel == messages.c.channel,
        later.c.text_stream == messages.c.text_stream,
        later.c.id > messages.c.id,
    ]
    if through is not None:
        condition.append(later.c.id <= through)
    return or_(messages.c.text_stream.is_(None), not_(exists().where(and_(*condition))))


def fold(engine: Engine, page: Page, max_bytes: int) -> Page:
    """`page` with each text stream's message replaced by the stream's text through it.

    The byte budget counts the folded texts: the page stops (more=True) after
    the message that spends it, as `read_page` stops on stored sizes.
    """
    last = {(m.channel, m.text_stream): m for m in page if m.text_stream is not None}
    if not last:
        return page
    texts = _texts(engine, last)
    folded: list[Message] = []
    spent = 0
    for message in page:
        if message.text_stream is not None:
            message = replace(message, data_json=texts[message.channel, message.text_stream])
        if folded and spent + len(message.data_json) > max_bytes:
            return replace(page, messages=tuple(folded), more=True)
        folded.append(message)
        spent += len(message.data_json)
    return replace(page, messages=tuple(folded))


def _texts(engine: Engine, last: dict[tuple[str, str], Message]) -> dict[tuple[str, str], str]:
    """The folded data of each (channel, stream) through its message in `last`."""
    through = max(m.id for m in last.values())
    streams = [and_(messages.c.channel == channel, messages.c.text_stream == sid) for channel, sid in last]
    query = (
        select(messages.c.channel, messages.c.text_stream, messages.c.id, messages.c.data)
        .where(or_(*streams), messages.c.id <= through)
        .order_by(messages.c.id)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    attempts: dict[tuple[str, str], _Attempt] = {}
    for row in rows:
        key = (row.channel, row.text_stream)
        if row.id > last[key].id:
            continue
        data = json.loads(row.data)
        attempt = attempts.get(key)
        if attempt is None or "text" in data:
            attempt = attempts[key] = _Attempt(data)  # a start (seq 0), or the oldest retained
        else:
            attempt.apply(data)
    return {key: attempt.folded(key[1]) for key, attempt in attempts.items()}


class _Attempt:
    """One attempt of a text stream, its messages applied by the client's rule."""

    def __init__(self, first: dict[str, Any]) -> None:
        self.seq = first.get("seq", 0)
        self.pieces = [first.get("text", first.get("delta", ""))]
        self.end = {key: first[key] for key in ("status", "error") if key in first}

    def apply(self, data: dict[str, Any]) -> None:
        if data["seq"] != self.seq + 1:
            # Stored twice (a repeat), or no next seq: a stale writer's late delta after the
            # next attempt's start. The client ignores both (realtime.js nextTextState).
            return
        self.seq = data["seq"]
        self.pieces.append(data.get("delta", ""))
        self.end = {key: data[key] for key in ("status", "error") if key in data}

    def folded(self, sid: str) -> str:
        return jsontext.encode({"text_stream": sid, "seq": self.seq, "text": "".join(self.pieces), **self.end})


def unended(engine: Engine, run_id: str) -> Sequence[Message]:
    """The last message of each text stream of `run_id` whose last message is no end: streams
    whose writer died mid-generation (the run's next attempt ends them, jobs/runner.py)."""
    newest = (
        select(func.max(messages.c.id).label("id"))
        .where(messages.c.run_id == run_id, messages.c.text_stream.is_not(None))
        .group_by(messages.c.channel, messages.c.text_stream)
        .subquery()
    )
    with engine.connect() as conn:
        rows = conn.execute(select(messages).join(newest, messages.c.id == newest.c.id).order_by(messages.c.id)).all()
    return [m for m in map(message_from, rows) if "status" not in json.loads(m.data_json)]
