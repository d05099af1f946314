"""Turning caller data into the JSON text that is stored and streamed, and a client's JSON text into data.

One encoder for messages and events alike: compact UTF-8 (no `\\uXXXX` for
every accent), no NaN or Infinity (browsers cannot parse them), no lone
surrogates (not UTF-8), no nesting deeper than `MAX_DEPTH`, and a size limit
checked on the bytes as stored.

One decoder for request bodies: strict UTF-8, no NaN or Infinity, and no
more than `MAX_VALUES` values, counted on the text before any is built: a
byte limit alone does not bound what parsing costs (issue 18).
"""
from __future__ import annotations

import json
from typing import Any

#: Most values (numbers, strings, arrays, objects; keys count too) `decode` builds from one
#: text. Parsing makes an object of each: `{},` is 3 bytes of text and an empty dict of some
#: 70, so the bytes a body limit allows can cost twenty times as much memory, all of it built
#: in one call that holds the gevent hub (issue 18). Data as stored (`, ` between values)
#: spends two bytes or more on each value counted, so any one message that
#: REALTIME_MAX_MESSAGE_BYTES (512 KiB) allows counts at most 262,144: it always fits.
MAX_VALUES = 300_000

#: Deepest nesting of arrays and objects accepted (docs/protocol.md §3.3): every
#: client's JSON parser, and the encoder's own recursion, stays far from its limit.
MAX_DEPTH = 64

_CONTAINERS = (dict, list, tuple)  # what json.dumps writes as objects and arrays


class NotJSON(ValueError):
    """The value cannot be stored as JSON text."""


class TooManyValues(ValueError):
    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} JSON values (numbers, strings, arrays, objects, keys)")
        self.limit = limit


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


def decode(raw: bytes, *, max_values: int = MAX_VALUES) -> Any:
    """The value of the JSON text `raw`: `TooManyValues` past `max_values`, before anything is
    parsed; `NotJSON` for text that is not strict UTF-8 JSON (NaN and Infinity included)."""
    if not values_within(raw, max_values):
        raise TooManyValues(max_values)
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise NotJSON(str(exc)) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Every byte but `"` and the four that come before a value or key, for `bytes.translate` to drop.
_NOT_MARKS = bytes(sorted(set(range(256)) - set(b'",:[{')))


def values_within(raw: bytes, limit: int) -> bool:
    """Whether parsing the JSON text `raw` builds at most `limit` values and keys, found with a
    few passes of C code over the bytes, without building any of them.

    Every value but the outermost comes after a `[`, `,` or `:`, and every key after a `{` or
    `,`: so those bytes outside strings, plus one, count them all (and each empty `[]` or `{}`
    once more). UTF-8 never uses ASCII bytes inside a character, so the bytes can be searched
    as they are.
    """
    if b"\\" in raw:
        # Escapes out first, so that every `"` left opens or closes a string. `replace` works from
        # the left as a parser reads, so in `\\\\"` the pair goes first and the quote stays.
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    marks = raw.translate(None, _NOT_MARKS)
    quotes = marks.count(b'"')
    if quotes // 2 > limit:
        return False  # each string is a value or a key
    count = len(marks) - quotes + 1
    if count <= limit:
        return True  # even counting the marks inside strings, if any
    # Text in strings can hold marks (CSV, JSON sent as a string): take out those between each
    # pair of quotes, one find per string, and there are at most `limit` strings.
    start = marks.find(b'"')
    while start != -1:
        end = marks.find(b'"', start + 1)
        if end == -1:
            break
        count -= end - start - 1
        start = marks.find(b'"', end + 1)
    return count <= limit
