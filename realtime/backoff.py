"""How long a subscriber waits before it connects again (realtime/client.py)."""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """How long to wait before connecting again.

    After `failures` failures in a row (a network error, a 5xx, a stream that brought nothing),
    a random wait between half and all of `initial_s` doubled per failure, up to `max_s`: spread
    out, yet sure to grow. A wait the server asks for (`retry:`, `Retry-After`) is obeyed up to
    `max_asked_s`. No wait is shorter than `min_s`, so a server answering `retry: 0` or
    `Retry-After: 0` gets at most 1/min_s requests a second from a subscriber.
    """

    initial_s: float = 0.5
    max_s: float = 30.0
    min_s: float = 0.25
    max_asked_s: float = 60.0

    def delay(self, failures: int) -> float:
        cap = min(self.max_s, self.initial_s * 2 ** min(max(0, failures - 1), 32))  # 2**1024 is no float
        return max(self.min_s, random.uniform(cap / 2, cap))

    def asked(self, seconds: float) -> float:
        return min(self.max_asked_s, max(self.min_s, seconds))

    def after_stream(self, retry_s: float, failures: int) -> float:
        """After a stream the server ended: half to all of its `retry:`; after one that brought
        nothing (`failures` > 0), no less than `delay(failures)`."""
        asked = self.asked(retry_s)
        wait = max(self.min_s, random.uniform(asked / 2, asked))
        return max(wait, self.delay(failures)) if failures else wait
