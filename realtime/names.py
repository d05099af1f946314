"""Channel and topic names (docs/protocol.md §3.4).

The patterns admit no whitespace, so no CR or LF from a client can ever reach
an `event:` line or break a frame.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from .errors import InvalidRequest

CHANNEL_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,200}")
TOPIC_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
IDEMPOTENCY_KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,200}")  # visible ASCII, as a header value allows
MAX_TOPICS = 50
MAX_CHANNELS = 100  # in one token (docs/protocol.md §12)


def check_channel(value: Any) -> str:
    if not isinstance(value, str) or not CHANNEL_PATTERN.fullmatch(value):
        raise InvalidRequest(
            "'channel' must be a string of 1-200 characters from A-Z a-z 0-9 _ . : -",
            code="invalid_channel",
        )
    return value


def check_topic(value: Any) -> str:
    if not isinstance(value, str) or not TOPIC_PATTERN.fullmatch(value):
        raise InvalidRequest(
            "a topic must be a string of 1-100 characters from A-Z a-z 0-9 _ . : -",
            code="invalid_topic",
        )
    return value


def check_topics(value: Any) -> tuple[str, ...]:
    """A non-empty list of distinct topic names, returned in the given order."""
    if not isinstance(value, (list, tuple)) or not value or len(value) > MAX_TOPICS:
        raise InvalidRequest(
            f"'topics' must be a list of 1-{MAX_TOPICS} topic names", code="invalid_topic"
        )
    topics = tuple(check_topic(topic) for topic in value)
    return tuple(dict.fromkeys(topics))


def check_channels(value: Any) -> dict[str, tuple[str, ...]]:
    """An object of 1-100 channel names, each to its list of 1-50 topics, returned in the given order."""
    if not isinstance(value, Mapping) or not 1 <= len(value) <= MAX_CHANNELS:
        raise InvalidRequest(
            f"'channels' must be an object of 1-{MAX_CHANNELS} channel names, each with its list of topics",
            code="invalid_channel",
        )
    return {check_channel(channel): check_topics(topics) for channel, topics in value.items()}


def check_run_id(value: Any) -> str:
    if not isinstance(value, str) or not RUN_ID_PATTERN.fullmatch(value):
        raise InvalidRequest(
            "'run_id' must be a string of 1-64 characters from A-Z a-z 0-9 _ . : -",
            code="invalid_run_id",
        )
    return value


def check_idempotency_key(value: Any) -> str:
    if not isinstance(value, str) or not IDEMPOTENCY_KEY_PATTERN.fullmatch(value):
        raise InvalidRequest(
            "'Idempotency-Key' must be 1-200 visible ASCII characters (a UUID will do)",
            code="invalid_idempotency_key",
        )
    return value
