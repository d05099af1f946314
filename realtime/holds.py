"""Holds: which messages live delivery keeps back, and until when (dispatch.py, visibility.py).

A hole in the ids means a transaction in flight may still commit there. Its
write intents say on which channels; the dispatcher then holds back, per
(transaction, channel key), the messages after where it stood, and lets the
rest through. When the transaction ends its holds go, and what they kept is
delivered in id order.
"""
from __future__ import annotations

from dataclasses import dataclass

from .reads import Message
from .schema import intent_key
from .visibility import Writer, Writers

ANY = None  # the key of a hold on every channel (a transaction that wrote without an intent)


@dataclass(frozen=True)
class Hold:
    """Messages of one channel key (ANY: of every channel) after `after_id` wait for `writer` to end."""

    writer: Writer
    after_id: int
    since: float
    #: Seen as the process started: messages at or below `after_id` may still commit too,
    #: so a stream of these channels reads its history only once the writer ended.
    from_prime: bool = False


class Holds:
    """The holds in force, by (transaction, key); an immutable value, swapped whole under the lock."""

    def __init__(self, holds: dict[tuple[str, int | None], Hold] | None = None) -> None:
        self.by_entry = holds or {}
        self._any = min((h.after_id for (_, k), h in self.by_entry.items() if k is ANY), default=None)
        self._by_key: dict[int, int] = {}  # the lowest after_id of each key's holds
        for (_, key), hold in self.by_entry.items():
            if key is not ANY:
                self._by_key[key] = min(self._by_key.get(key, hold.after_id), hold.after_id)

    def __bool__(self) -> bool:
        return bool(self.by_entry)

    def after(self, key: int) -> int | None:
        """The id after which messages of this key are held, None when they are not."""
        return min((after for after in (self._by_key.get(key), self._any) if after is not None), default=None)

    def held(self, message: Message) -> bool:
        if not self.by_entry:
            return False
        after = self.after(intent_key(message.channel))
        return after is not None and message.id > after

    def from_prime(self, key: int) -> bool:
        return any(h.from_prime and h.writer.may_write(key) for h in self.by_entry.values())

    def adding(self, writers: Writers, position: int, now: float, *, from_prime: bool = False) -> Holds:
        """These holds, and one for each (writer, key) not held yet, after `position`."""
        entries = dict(self.by_entry)
        for writer in writers:
            for key in writer.keys if writer.keys is not None else (ANY,):
                entries.setdefault((writer.vxid, key), Hold(writer, position, now, from_prime))
        return Holds(entries)

    def without_ended(self, writers: Writers) -> tuple[Holds, list[Hold]]:
        """(the holds whose writer still runs, the ended ones)."""
        kept = {e: h for e, h in self.by_entry.items() if writers.running(h.writer.vxid)}
        ended = [h for e, h in self.by_entry.items() if e not in kept]
        return Holds(kept), ended
