"""Cursors: the opaque `id:` of each frame, sent back as `Last-Event-ID`.

A cursor is `<epoch>-<message id>`. The epoch is a random tag created with the
database (store.py), so a cursor from another database, or from one that was
wiped and recreated, is recognised as such instead of being silently misread
as a position in this one (docs/protocol.md §6, reset `unknown_cursor`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InvalidCursor

_CURSOR = re.compile(r"([0-9a-f]{8,32})-([0-9]{1,19})")
_MAX_ID = 2**63 - 1  # BIGINT: a larger number could not be compared in SQL


@dataclass(frozen=True)
class Cursor:
    epoch: str
    message_id: int

    def __str__(self) -> str:
        return f"{self.epoch}-{self.message_id}"

    @classmethod
    def parse(cls, text: str) -> "Cursor":
        match = _CURSOR.fullmatch(text)
        if match is None or int(match.group(2)) > _MAX_ID:
            raise InvalidCursor(
                "Last-Event-ID / last_event_id must be a cursor this server sent as an 'id:' "
                "(like '3f9a1c2b-17'); omit it to start from the oldest retained message"
            )
        return cls(match.group(1), int(match.group(2)))
