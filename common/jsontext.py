"""Turning caller data into the JSON text that is stored and streamed.

One encoder for messages and events alike: compact UTF-8 (no `\\uXXXX` for
every accent), no NaN or Infinity (browsers cannot parse them), no lone
surrogates (not UTF-8), no nesting deeper than `MAX_DEPTH`, and a size limit
checked on the bytes as stored.
"""
from __future__ import annotations

import json
from typing import Any

#: Deepest nesting of arrays and objects accepted (docs/protocol.md §3.3): every
#: client's JSON parser, and the encoder's own recursion, stays far from its limit.
MAX_DEPTH = 64

_CONTAINERS = (dict, list, tuple)  # what json.dumps writes as objects and arrays


class NotJSON(ValueError):
    """The value cannot be stored as JSON text."""


class TooLarge(ValueError):
    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes of JSON; the limit is {limit}")
        self.size, self.limit = size, limit


# Built once: json.dumps with options builds an encoder per call (a batch of
# 1,000 messages spent a fifth of its checking time doing that).
_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False)


def encode(value: Any, *, max_bytes: int | None = None) -> str:
    check_depth(value)
    try:
        text = _ENCODER.encode(value)
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


def check_depth(value: Any) -> None:
    """`NotJSON` if arrays and objects nest deeper than `MAX_DEPTH`.

    Depth counts containers: a scalar is 0, `[]` and `{"a": 1}` are 1,
    `[[1]]` is 2. The walk goes one level at a time, without recursion, so
    no nesting an in-process caller builds can exhaust the stack; each level
    keeps a container once (by identity), so shared or circular references
    cannot multiply the work (a cycle simply ends up too deep).
    """
    if not isinstance(value, _CONTAINERS):
        return
    children = value.values() if isinstance(value, dict) else value
    if not any(isinstance(child, _CONTAINERS) for child in children):
        return  # one level, the usual message: no walk needed
    level = {id(value): value}
    depth = 0
    while level:
        depth += 1
        if depth > MAX_DEPTH:
            raise NotJSON(f"arrays and objects are nested deeper than {MAX_DEPTH} levels, the limit")
        level = {
            id(child): child
            for container in level.values()
            for child in (container.values() if isinstance(container, dict) else container)
            if isinstance(child, _CONTAINERS)
        }
