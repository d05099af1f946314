"""HTTP endpoints of docs/protocol.md §5: translate requests to `Realtime` calls.

Everything a client sends is checked here or in the calls below *before* any
write or any streamed byte; failures raise `RealtimeError`s, which common/errors.py
turns into JSON. Nothing in this module touches the database.
"""
from __future__ import annotations

import json
import re
from typing import Any

from flask import Blueprint, Response, current_app, g, request

from common.request_input import bearer_matches, bearer_token, json_object

from .admission import ClosingBody
from .errors import Forbidden, InvalidRequest, InvalidToken, MessageTooLarge, NotFound
from .extension import Realtime
from .names import check_channel, check_channels, check_topics
from .store import Message
from .tokens import Grant

blueprint = Blueprint("realtime", __name__, url_prefix="/api/realtime")

MAX_HISTORY_LIMIT = 1000

#: A publish body is its `data` plus the JSON around it: names, run_id, punctuation, spaces.
ENVELOPE_ROOM = 64 * 1024


def publish_body_limit(realtime: Realtime) -> int:
    """The most a publish body may weigh, refused before it is read (docs/protocol.md §3.3): one message,
    or a batch of them (docs/protocol.md §9) up to REALTIME_MAX_BATCH_BYTES; each message is checked too."""
    return max(realtime.max_message_bytes + ENVELOPE_ROOM, realtime.max_batch_bytes)


def _realtime() -> Realtime:
    return current_app.extensions["realtime"]


def _granted_scope() -> tuple[Grant, tuple[str, ...]]:
    """The verified token of this request, and the topics to read (optionally narrowed by `?topic=`).

    For a token of several channels the second item is () and `_several_scope` says what to read."""
    token = bearer_token() or request.args.get("token")
    if not token:
        raise InvalidToken(
            "a subscription token is required: ?token=... or 'Authorization: Bearer ...'; "
            "get one from POST /api/realtime/token"
        )
    grant = _realtime().tokens.verify(token)
    if grant.several:
        return grant, ()
    channel = request.args.get("channel")
    if channel is not None and channel != grant.channel:
        raise Forbidden(f"this token is for channel {grant.channel!r}, not {channel!r}")
    topics = request.args.getlist("topic")
    if not topics:
        return grant, grant.topics
    outside = sorted(set(topics) - set(grant.topics))
    if outside:
        raise Forbidden(f"this token does not cover topics {outside}")
    return grant, tuple(t for t in grant.topics if t in topics)


def _several_scope(grant: Grant) -> dict[str, tuple[str, ...]]:
    """The channels and topics to read with a token of several channels (docs/protocol.md §12):
    all it grants, or those `?channel=` and `?topic=` (both repeatable) narrow it to."""
    scope = dict(grant.channels)
    channels = request.args.getlist("channel")
    if channels:
        outside = sorted(set(channels) - set(scope))
        if outside:
            raise Forbidden(f"this token does not cover channels {outside}")
        scope = {c: t for c, t in scope.items() if c in channels}
    topics = request.args.getlist("topic")
    if topics:
        outside = sorted(set(topics) - {t for granted in scope.values() for t in granted})
        if outside:
            raise Forbidden(f"this token does not cover topics {outside}")
        scope = {c: kept for c, t in scope.items() if (kept := tuple(x for x in t if x in topics))}
    return scope


def _since(scope: dict[str, tuple[str, ...]]) -> dict[str, str | None] | None:
    """`?since=run.3:0,run.4:<cursor>`: channels that start from their own position (docs/protocol.md §12)."""
    value = request.args.get("since")
    if value is None:
        return None
    since: dict[str, str | None] = {}
    for item in value.split(","):
        channel, colon, position = item.rpartition(":")
        if not colon or not channel or not position:
            raise InvalidRequest(
                "'since' must be a comma-separated list of <channel>:<cursor>, or <channel>:0 for a channel's "
                "oldest retained message", code="invalid_last_event_id",
            )
        if channel not in scope:
            raise Forbidden(f"'since' names channel {channel!r}, which this stream does not carry")
        since[channel] = None if position == "0" else position
    return since


@blueprint.post("/token")
def create_token() -> dict[str, Any]:
    body = json_object()  # a channel and a few topics, or up to 100 of them: the small default limit
    if "channels" in body:  # docs/protocol.md §12
        if "channel" in body or "topics" in body:
            raise InvalidRequest(
                "send either 'channel' and 'topics', or 'channels' ({channel: [topics]}), not both",
                code="invalid_channel",
            )
        return _realtime().grant_for_request_of(check_channels(body["channels"])).to_json()
    channel = check_channel(body.get("channel"))
    topics = check_topics(body.get("topics"))
    return _realtime().grant_for_request(channel, topics).to_json()


@blueprint.post("/publish")
def publish() -> Response:
    realtime = _realtime()
    if not realtime.publish_key:
        raise NotFound("publishing over HTTP is off; the server sets REALTIME_PUBLISH_KEY to enable it")
    if not bearer_matches(realtime.publish_key):
        raise InvalidToken(
            "publishing needs 'Authorization: Bearer <REALTIME_PUBLISH_KEY>'", code="invalid_publish_key"
        )
    body = json_object(publish_body_limit(realtime), too_large=MessageTooLarge)
    if "messages" in body:
        if request.headers.get("Idempotency-Key") is not None:
            raise InvalidRequest("Idempotency-Key applies to one message, not a batch", code="invalid_idempotency_key")
        return _json_text(_envelopes(realtime.publish_many(body["messages"])) + "}", 201)
    if "data" not in body:
        raise InvalidRequest("'data' is required (any JSON value)", code="invalid_data")
    message = realtime.publish(
        body.get("channel"), body.get("topic"), body["data"], run_id=body.get("run_id"),
        idempotency_key=request.headers.get("Idempotency-Key"),
    )
    response = _json_text(message.envelope_json(), 201)
    if message.replayed:
        response.headers["Idempotent-Replayed"] = "true"  # the same answer as the first time (Stripe's header)
    return response


@blueprint.get("/messages")
def history() -> Response:
    grant, topics = _granted_scope()
    raw_limit = request.args.get("limit", "100")
    if not re.fullmatch(r"[0-9]{1,4}", raw_limit) or not 1 <= int(raw_limit) <= MAX_HISTORY_LIMIT:
        raise InvalidRequest(f"'limit' must be an integer from 1 to {MAX_HISTORY_LIMIT}", code="invalid_limit")
    after = request.args.get("after") or None
    if grant.several:
        found, cursor, reset = _realtime().history_of(_several_scope(grant), after, int(raw_limit))
    else:
        found, cursor, reset = _realtime().history(grant.channel, topics, after, int(raw_limit))
    # The stored envelopes as they are, never parsed again: a body is the
    # sum of its messages, and data stored by an older version with deeper
    # nesting than the parser allows still comes out.
    tail = f', "cursor": {json.dumps(cursor)}'
    if reset is not None:
        tail += f', "reset": {json.dumps(reset.to_json())}'
    return _json_text(_envelopes(found) + tail + "}", 200)


def _envelopes(stored: list[Message]) -> str:
    """`{"messages": [...]` (left open): the stored envelopes as they are, never parsed again."""
    return '{"messages": [' + ", ".join(m.envelope_json() for m in stored) + "]"


def _json_text(text: str, status: int) -> Response:
    return Response(text, status=status, mimetype="application/json")


@blueprint.get("/subscribe")
def subscribe() -> Response:
    grant, topics = _granted_scope()
    realtime = _realtime()
    # Counted once the signature is verified (a forged token takes no real one's streams), and
    # given back when the server closes the response (stream_limits.py): 429 too_many_streams.
    release = realtime.stream_limits.claim(grant)
    try:
        # The header (sent by EventSource on reconnect) wins over the query
        # parameter (used for the first connection of a resuming client).
        header = request.headers.get("Last-Event-ID") or None
        cursor = header or request.args.get("last_event_id") or None
        if grant.several:
            scope = _several_scope(grant)
            since = _since(scope)
            if since is not None:
                # The query's cursor is where the other channels start, the header how far a
                # reconnect got: each channel goes on from the later (docs/protocol.md §12).
                cursor = request.args.get("last_event_id") or None
            frames = realtime.stream_of(
                scope, cursor, since=since, progress=header if since is not None else None,
                request_id=g.get("request_id"),
            )
        else:
            frames = realtime.stream(grant.channel, topics, cursor, request_id=g.get("request_id"))
    except BaseException:
        release()
        raise
    return Response(
        ClosingBody(frames, release),  # no Python call per frame between the server and the stream
        # The frames are bytes already: hand them to the server without
        # Werkzeug's per-chunk encoding (it still calls close() when the
        # client goes away, which closes the generator, then releases).
        direct_passthrough=True,
        headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: do not buffer the stream
        },
    )
