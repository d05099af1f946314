"""The store's hottest reads, each statement built once and kept.

Building a page's statement with SQLAlchemy (its subqueries, its window and
the fold's condition) costs about a millisecond of CPU, several times what
PostgreSQL takes to answer it. A stream's first replay read and the
dispatcher's read of new rows run with a few shapes only, so each shape is
built once, of bound parameters, and run with the values: SQLAlchemy then finds
its compiled form in its cache by the statement alone. 1,000 streams opening at
once no longer spend a second of the worker's CPU building statements
(bench/README.md, "Text streams").
"""
from __future__ import annotations

from functools import lru_cache

from sqlalchemy import BigInteger, Select, String, any_, bindparam, select, text
from sqlalchemy.dialects.postgresql import ARRAY

from .folding import not_superseded
from .reads import page_query
from .schema import INTENT_KEY_SQL, messages


@lru_cache(maxsize=None)
def channel_page(postgres: bool, topics: bool, through: bool) -> Select:
    """A channel's replay page after `:after_id` (and up to `:through`), of `:topics` or of all,
    with the channel's prune mark: `MessageStore.read_after`."""
    where = [messages.c.channel == bindparam("channel"), messages.c.id > bindparam("after_id", type_=BigInteger)]
    if topics:
        where.append(messages.c.topic.in_(bindparam("topics", expanding=True)))
    limit = bindparam("through", type_=BigInteger) if through else None
    where.append(not_superseded(limit))
    if limit is not None:
        where.append(messages.c.id <= limit)
    return page_query(where, postgres=postgres, pruned_channel=bindparam("channel"))


@lru_cache(maxsize=None)
def new_rows(postgres: bool, through: bool, keys: bool) -> Select:
    """Every channel's messages after `:after_id` (and up to `:through`), or those of the
    channels of the intent keys `:keys` (PostgreSQL): `MessageStore.read_new`, the dispatcher's."""
    where = [messages.c.id > bindparam("after_id", type_=BigInteger)]
    if through:
        where.append(messages.c.id <= bindparam("through", type_=BigInteger))
    if keys:
        where.append(text(f"{INTENT_KEY_SQL} = ANY(:keys)"))
    return page_query(where, postgres=postgres)


@lru_cache(maxsize=None)
def text_starts(postgres: bool) -> Select:
    """The attempts of text streams on `:channels` that started after id `:after`: a flush's
    question whether a newer attempt of one of its streams began (`MessageStore.newer_text_starts`).
    On PostgreSQL the channels are one array parameter: the same statement for any number of them
    (an IN list of 500 cost 3 ms of the writer's CPU per flush to render and send)."""
    if postgres:
        channels = messages.c.channel == any_(bindparam("channels", type_=ARRAY(String)))
    else:
        channels = messages.c.channel.in_(bindparam("channels", expanding=True))
    return select(messages.c.channel, messages.c.text_stream, messages.c.id).where(
        messages.c.text_seq == 0, channels, messages.c.id > bindparam("after", type_=BigInteger),
    )
