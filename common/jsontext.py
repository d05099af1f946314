"""Turning caller data into the JSON text that is stored and streamed.

One encoder for messages and events alike: compact UTF-8 (no `\\uXXXX` for
every accent), no NaN or Infinity (browsers cannot parse them), no lone
surrogates (not UTF-8), and a size limit checked on the bytes as stored.
"""
from __future__ import annotations

import json
from typing import Any


class NotJSON(ValueError):
    """The value cannot be stored as JSON text."""


class TooLarge(ValueError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes of JSON; the limit is {limit}")
        self.size, self.limit = size, limit


def encode(value: Any, *, max_bytes: int | None = None) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        # U+0085, U+2028 and U+2029 as escapes: the same JSON, but safe for
        # clients that split lines more eagerly than the SSE spec does.
        if "\u2028" in text or "\u2029" in text or "\x85" in text:
            text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085")
        size = len(text.encode())  # refuses lone surrogates
    except (TypeError, ValueError, RecursionError) as exc:
        raise NotJSON(str(exc)) from None
    if max_bytes is not None and size > max_bytes:
        raise TooLarge(size, max_bytes)
    return text
