"""What every publish checks, in one place: `Realtime` (in Flask) and `Publisher` (anywhere) alike.

A message is checked and its data encoded to the stored JSON text before any
SQL, so a bad one is a 4xx `RealtimeError` and nothing is written.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from common import jsontext

from .errors import InvalidRequest, MessageTooLarge, RealtimeError
from .names import check_channel, check_run_id, check_topic
from .store import NewMessage

MAX_BATCH = 1000  # messages in one publish_many (docs/protocol.md §9)
MAX_TEXT_STREAM_ID = 200  # characters, as the column holds


def check_message(channel: Any, topic: Any, data: Any, run_id: Any, *, max_bytes: int) -> NewMessage:
    """A message to store, or the 4xx error that says what is wrong with it."""
    check_channel(channel)
    check_topic(topic)
    if run_id is not None:
        check_run_id(run_id)
    try:
        data_json = jsontext.encode(data, max_bytes=max_bytes)
    except jsontext.NotJSON as exc:
        raise InvalidRequest(f"'data' must be JSON-serializable: {exc}", code="invalid_data") from None
    except jsontext.TooLarge as exc:
        raise MessageTooLarge(
            f"'data' is {exc} (REALTIME_MAX_MESSAGE_BYTES). Publish a link to large content instead."
        ) from None
    return NewMessage(channel, topic, data_json, run_id)


def check_batch(messages: Sequence[Mapping[str, Any]], *, max_bytes: int) -> list[NewMessage]:
    """1-1000 `{"channel", "topic", "data", "run_id"?}`, each checked as `check_message` checks one."""
    if not isinstance(messages, (list, tuple)) or not 1 <= len(messages) <= MAX_BATCH:
        raise InvalidRequest(f"'messages' must be a list of 1 to {MAX_BATCH} messages", code="invalid_messages")
    checked = []
    for index, item in enumerate(messages):
        if not isinstance(item, Mapping) or "data" not in item:
            raise InvalidRequest(
                f"messages[{index}] is not an object {{\"channel\", \"topic\", \"data\", \"run_id\"?}}",
                code="invalid_messages",
            )
        try:
            checked.append(check_message(
                item.get("channel"), item.get("topic"), item["data"], item.get("run_id"), max_bytes=max_bytes
            ))
        except RealtimeError as exc:  # the same code, saying which message: nothing is stored
            raise type(exc)(f"messages[{index}]: {exc.message}", code=exc.code) from None
    return checked


def check_text_stream(channel: Any, topic: Any, sid: Any, run_id: Any) -> tuple[str, str, str | None]:
    """A text stream's channel, topic and id (None: a random one), or the 4xx error."""
    check_channel(channel)
    check_topic(topic)
    if run_id is not None:
        check_run_id(run_id)
    if sid is not None and not (isinstance(sid, str) and 1 <= len(sid) <= MAX_TEXT_STREAM_ID):
        raise ValueError(f"a text stream's id must be a string of 1 to {MAX_TEXT_STREAM_ID} characters")
    return channel, topic, sid
