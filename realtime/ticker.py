"""The dispatcher's clock work: keep-alives and send timeouts, on a thread of its own.

The reader (dispatch.py) may wait on a database that is away; these two must
not, so they run on a second thread (a greenlet under gevent) that depends on
nothing but the clock: every `tick_s`, a `: keep-alive` for each stream quiet
for about `heartbeat_s` (docs/protocol.md §6), and the end of each stream
whose write to its client has waited `send_timeout_s` (§7).

A mixin of `Dispatcher`, whose channels, lock and clock it walks.
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .subscription import Channel

log = logging.getLogger(__name__)


class Ticker:
    heartbeat_s: float
    tick_s: float
    send_timeout_s: float
    _channels: dict[str, Channel]
    _lock: threading.Lock
    _clock: Callable[[], float]
    _stopping: bool
    _stopped: threading.Event

    def send_keep_alives(self) -> None:
        """Queue `: keep-alive` for every stream that was quiet for about heartbeat_s."""
        now = self._clock()
        quiet_since = now - (self.heartbeat_s - self.tick_s)
        with self._lock:
            for channel in self._channels.values():
                queued = [s.keep_alive(now) for s in channel.subscriptions if s.quiet_since <= quiet_since]
                if any(queued):
                    channel.wake()

    def cut_stalled(self) -> int:
        """End the streams blocked writing to a client for send_timeout_s; return how many.

        A client that stops reading fills its socket buffers, and the stream's
        write then waits: the queue bound cannot see it, and the stream would
        hold its greenlet, its buffers and any reload until the client goes.
        """
        stalled_since = self._clock() - self.send_timeout_s
        with self._lock:
            stalled = {  # a set: one of several channels is in each of its channels' sets
                s for channel in self._channels.values() for s in channel.subscriptions
                if s.writing_since is not None and s.writing_since <= stalled_since
            }
        for subscription in stalled:
            subscription.cut("send_timeout")
        return len(stalled)

    def _tick_forever(self) -> None:
        while not self._stopping:
            self._stopped.wait(self.tick_s)
            try:
                self.send_keep_alives()
                self.cut_stalled()
            except Exception:
                log.exception("realtime ticker failed")
