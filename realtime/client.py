"""A Python subscriber over HTTP (docs/protocol.md §10): what EventSource does in a browser, for a script.

    with subscribe("https://example.org", token=fetch_token) as messages:
        for message in messages:
            print(message.topic, message.data)
            save_position(messages.cursor)      # resume later with last_event_id=...

It keeps the last cursor and sends it back as `Last-Event-ID` on every
reconnect, so each message arrives once, in order, whatever breaks in between
(docs/protocol.md §6). It reconnects after the server's `retry:` when a stream ends,
backs off with jitter on network errors and 5xx (a 503's `Retry-After` wins),
asks a token callable again on 401, and raises `SubscribeRefused` for any
other 4xx: retrying a request the server refuses would only hammer it.

It trusts nothing the server sends (issue 18 item 5). A frame may hold at most
`max_frame_bytes`, checked as its bytes arrive; every wait is clamped by
`Backoff`, and a stream that brought neither a message nor a keep-alive counts
as a failure, so `retry: 0` cannot turn it into a loop of requests; a message
at or before the last one delivered is dropped; and whatever it cannot use (bad
JSON, a missing or mistyped field, a message without a usable `id:`) raises
`ProtocolError`, with the cursor still at the last message delivered.

It reads the wire format itself (sse_reader.py) rather than through httpx-sse,
which buffers a line and a frame without bound and has no setting to limit them
(a `data:` line that never ended grew a client to 3.3 GB in 15 s).
"""
from __future__ import annotations

import inspect
import json
import re
import socket
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import httpx

from .backoff import Backoff
from .sse_reader import Frame, FrameTooLarge, read_frames

SUBSCRIBE_PATH = "/api/realtime/subscribe"
TOKEN_PATH = "/api/realtime/token"

#: The largest frame read: eight times the largest message frame of a server with the default
#: REALTIME_MAX_MESSAGE_BYTES (512 KiB of data plus its envelope); raise both together.
MAX_FRAME_BYTES = 4 * 1024 * 1024
#: The most of a JSON answer (an error, a token grant) read.
MAX_BODY_BYTES = 1024 * 1024

#: A token, or what returns a fresh one: a string, or a grant `{"token", ...}` as POST /api/realtime/token answers.
TokenSource = Union[str, Callable[[], Union[str, Mapping[str, Any]]]]

_HEADER_VALUE = re.compile(r"[\x21-\x7e]{1,1024}")  # what can be sent back as Last-Event-ID or a bearer token
_DIGITS = re.compile(r"[0-9]+")  # `retry:` (WHATWG HTML §9.2.6) and delay-seconds (RFC 9110 §10.2.3): ASCII only


@dataclass(frozen=True)
class ClientMessage:
    """One message of the stream: its envelope (docs/protocol.md §5) and its cursor."""

    id: int
    cursor: str
    channel: str
    topic: str
    data: Any
    run_id: str | None
    created_at: datetime


@dataclass(frozen=True)
class ClientReset:
    """The server could not resume exactly (`history_truncated`, `unknown_cursor`): the
    stream goes on from `cursor`, the oldest retained message; what came before is lost."""

    reason: str
    cursor: str


class ClientError(Exception):
    """The root of the subscriber's errors."""


class SubscribeRefused(ClientError):
    """The server refused the subscription with a 4xx that retrying cannot fix."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class ProtocolError(ClientError):
    """The server sent what the protocol (docs/protocol.md) does not allow: the subscription ends, its cursor at the
    last message delivered (resuming would only read the same bytes again)."""


class ClientSubscription:
    """An iterator of `ClientMessage`s that never ends by itself; `close()` ends it, from any thread."""

    def __init__(
        self,
        base_url: str,
        token: TokenSource,
        *,
        last_event_id: str | None = None,
        topics: Sequence[str] | None = None,
        since: Mapping[str, str | None] | None = None,
        on_reset: Callable[[ClientReset], None] | None = None,
        backoff: Backoff = Backoff(),
        read_timeout_s: float = 60.0,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        client: httpx.Client | None = None,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        if not isinstance(token, str) and not callable(token):
            raise TypeError("token must be a string or a callable that returns one")
        self.url = base_url.rstrip("/") + SUBSCRIBE_PATH
        self._token_source = token
        self._token: str | None = token if isinstance(token, str) else None
        self._token_is_new = False  # fetched for this very request: a 401 then is not about expiry
        #: Where the stream stands: pass it as `last_event_id` to resume in another process.
        self.cursor = last_event_id
        self._last_id: int | None = None  # envelope id of the last message delivered
        self.topics = list(topics) if topics else None  # narrows the token's topics (?topic=)
        # A token of several channels: channels that start from their own cursor (None: their oldest
        # message) instead of `last_event_id` (docs/protocol.md §12). The URL then keeps both, and
        # Last-Event-ID says only how far these connections got.
        self._since = ",".join(f"{c}:{at or 0}" for c, at in since.items()) if since else None
        self._base = last_event_id
        self.on_reset = on_reset
        self.last_reset: ClientReset | None = None
        self.backoff = backoff
        self.max_frame_bytes = max_frame_bytes
        # A dead peer sends no FIN: without keep-alives for this long, reconnect (the server sends
        # one every REALTIME_HEARTBEAT_S, 15 s by default).
        self._client = client or httpx.Client(timeout=httpx.Timeout(10.0, read=read_timeout_s))
        self._owns_client = client is None
        self._closed = threading.Event()
        # What waits between connections; close() interrupts the default. Tests pass one that
        # records the waits the client chose, so they need not sleep through them.
        self._sleep = sleep or self._closed.wait
        self._socket: socket.socket | None = None
        self._messages = self._run()

    def __iter__(self) -> ClientSubscription:
        return self

    def __next__(self) -> ClientMessage:
        return next(self._messages)

    def __enter__(self) -> ClientSubscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop: the iteration ends (a read blocked in another thread returns at once)."""
        self._closed.set()
        sock = self._socket
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a recv() blocked in the iterating thread
            except OSError:
                pass
        state = inspect.getgeneratorstate(self._messages)
        if state != inspect.GEN_RUNNING:
            self._messages.close()  # a started loop's `finally` releases the connection ...
            if state == inspect.GEN_CREATED:
                self._release()  # ... one never started has no `finally` to run

    # -- the loop: connect, read, decide how long to wait, again ----------------------

    def _run(self) -> Iterator[ClientMessage]:
        failures = 0
        retry_s = 2.0
        try:
            while not self._closed.is_set():
                try:
                    with self._client.stream("GET", self.url, **self._request()) as response:
                        wait_s = self._wait_after(response, failures)
                        if wait_s is None:  # a stream: read it to its end
                            self._socket = response.extensions["network_stream"].get_extra_info("socket")
                            brought_nothing = True
                            for frame in self._frames(response):
                                if frame.retry_ms is not None:
                                    retry_s = frame.retry_ms / 1000
                                message = self._message(frame)
                                # A keep-alive counts too: a proxy that cuts quiet streams is no failure.
                                if message is not None or frame.comment:
                                    failures, brought_nothing = 0, False
                                if message is not None:
                                    yield message
                            if brought_nothing:
                                failures += 1
                            wait_s = self.backoff.after_stream(retry_s, failures)  # ended by the server
                        elif self._token is None:
                            continue  # a new token: at once
                        else:
                            failures += 1
                except httpx.TransportError:
                    failures += 1
                    wait_s = self.backoff.delay(failures)
                finally:
                    self._socket = None
                self._sleep(wait_s)
        finally:
            self._release()

    def _frames(self, response: httpx.Response) -> Iterator[Frame]:
        try:
            yield from read_frames(response.iter_raw(), self.max_frame_bytes)
        except FrameTooLarge as too_large:
            raise ProtocolError(f"{too_large} (max_frame_bytes; a server with a larger "
                                "REALTIME_MAX_MESSAGE_BYTES needs a larger one)") from None

    def _request(self) -> dict[str, Any]:
        self._token_is_new = self._token is None
        if self._token is None:
            self._token = _token_text(self._token_source())
        # identity: a compressed body could inflate a thousandfold in one read, past every bound here
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "text/event-stream",
                   "Accept-Encoding": "identity"}
        params: dict[str, Any] = {"topic": self.topics} if self.topics else {}
        if self._since is not None:
            params["since"] = self._since
            if self._base is not None:
                params["last_event_id"] = self._base
            if self.cursor is not None and self.cursor != self._base:
                headers["Last-Event-ID"] = self.cursor
        elif self.cursor is not None:
            headers["Last-Event-ID"] = self.cursor
        return {"headers": headers, "params": params or None}

    def _wait_after(self, response: httpx.Response, failures: int) -> float | None:
        """None to read the stream; else seconds to wait before the next try; or raise."""
        status = response.status_code
        if status == 200:
            content_type = response.headers.get("content-type", "")
            if not content_type.startswith("text/event-stream"):
                raise SubscribeRefused(status, "not_an_event_stream",
                                       f"{self.url} answered {content_type!r}: is the base URL right?")
            encoding = response.headers.get("content-encoding", "")
            if encoding.lower() not in ("", "identity"):
                raise ProtocolError(f"{self.url} sent its stream with Content-Encoding {encoding!r}, "
                                    "though asked for identity")
            return None
        body = _read_at_most(response, MAX_BODY_BYTES)
        if status == 401 and not isinstance(self._token_source, str) and not self._token_is_new:
            self._token = None  # expired (tokens only open streams for a while): ask the callable again
            return 0
        retry_after = response.headers.get("retry-after", "")
        if status in (429, 503) and _DIGITS.fullmatch(retry_after):  # an HTTP-date or garbage: backoff
            return self.backoff.asked(float(retry_after))
        if status >= 500 or status == 429:
            return self.backoff.delay(failures + 1)
        code, message = _error_of(body)
        if status == 401 and isinstance(self._token_source, str):
            message += " (a token given as a string cannot be renewed: pass a callable that fetches a fresh one)"
        raise SubscribeRefused(status, code, message)

    def _message(self, frame: Frame) -> ClientMessage | None:
        """The new message a frame carries, if any; a reset is reported here."""
        if not frame.data:
            return None  # `retry:`, a keep-alive: the spec dispatches no event without data
        if frame.event == "reset":
            reset = _reset_of(frame)
            self.cursor, self.last_reset = reset.cursor, reset
            self._last_id = None  # ids start again from the oldest retained (maybe lower: another database)
            if self.on_reset is not None:
                self.on_reset(reset)
            return None
        message = _message_of(frame)
        if self._last_id is not None and message.id <= self._last_id:
            return None  # sent already: a server that ignored Last-Event-ID sends each message once all the same
        self.cursor, self._last_id = message.cursor, message.id
        return message

    def _release(self) -> None:
        if self._owns_client:
            self._client.close()


def subscribe(base_url: str, token: TokenSource, *, last_event_id: str | None = None, **options: Any) -> ClientSubscription:
    """Subscribe to the channels and topics `token` names (one, or several on one stream: each
    message's `.channel` says which); see `ClientSubscription` for the options."""
    return ClientSubscription(base_url, token, last_event_id=last_event_id, **options)


def token_from(
    base_url: str, channel: str | Mapping[str, Sequence[str]], topics: Sequence[str] = (), *, timeout_s: float = 10.0
) -> Callable[[], str]:
    """A token callable that asks the server's POST /api/realtime/token (its authorization policy decides):
    for one channel and its topics, or for several, `token_from(url, {"run.1": ["status"], ...})`."""
    url = base_url.rstrip("/") + TOKEN_PATH
    if isinstance(channel, Mapping):
        asked: dict[str, Any] = {"channels": {c: list(t) for c, t in channel.items()}}
    else:
        asked = {"channel": channel, "topics": list(topics)}

    def fetch() -> str:
        with httpx.stream("POST", url, json=asked, timeout=timeout_s,
                          headers={"Accept-Encoding": "identity"}) as response:
            body = _read_at_most(response, MAX_BODY_BYTES)
        if response.status_code != 200:
            raise SubscribeRefused(response.status_code, *_error_of(body))
        token = _json_object(body).get("token")
        if not isinstance(token, str) or not _HEADER_VALUE.fullmatch(token):
            raise ProtocolError(f"{url} answered 200 without a token: {body[:200]!r}")
        return token

    return fetch


def _token_text(value: str | Mapping[str, Any]) -> str:
    token = value.get("token") if isinstance(value, Mapping) else value
    if not isinstance(token, str) or not token:
        raise TypeError(f"the token callable must return a token string or a grant {{'token': ...}}, not {value!r}")
    return token


def _read_at_most(response: httpx.Response, limit: int) -> bytes:
    """The body's first `limit` bytes, as sent (never inflated): an error page can be endless too."""
    body = bytearray()
    for chunk in response.iter_raw():
        body += chunk[: limit - len(body)]
        if len(body) >= limit:
            break
    return bytes(body)


def _error_of(body: bytes) -> tuple[str, str]:
    """(code, message) of a docs/protocol.md §3 JSON error, or a stand-in for a body that is not one."""
    error = _json_object(body).get("error")
    if isinstance(error, dict) and "code" in error and "message" in error:
        return str(error["code"]), str(error["message"])
    return "http_error", body[:200].decode(errors="replace") or "(no body)"


def _json_object(text: str | bytes) -> dict[str, Any]:
    """The JSON object in `text`, or {} for anything else (bad JSON, nested past the parser's depth)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


# -- what a frame means (docs/protocol.md) ----------------------------------------


def _message_of(frame: Frame) -> ClientMessage:
    if frame.id is None or not _HEADER_VALUE.fullmatch(frame.id):
        # Without its own cursor a message could not be resumed after: the next connection would
        # start over from the last one that had one (or from the beginning).
        raise ProtocolError(f"a {frame.event!r} frame without a usable id: {frame.id!r}")
    envelope = _json_object(frame.data)
    fields = _typed(envelope, id=int, channel=str, topic=str, run_id=(str, type(None)), created_at=str)
    if fields is None or "data" not in envelope:
        raise ProtocolError(f"not an envelope of the protocol (docs/protocol.md): {frame.data[:200]!r}")
    try:
        fields["created_at"] = datetime.fromisoformat(fields["created_at"])
    except ValueError:
        raise ProtocolError(f"created_at is no ISO 8601 time: {fields['created_at'][:100]!r}") from None
    return ClientMessage(cursor=frame.id, data=envelope["data"], **fields)


def _reset_of(frame: Frame) -> ClientReset:
    fields = _typed(_json_object(frame.data), reason=str, cursor=str)
    if fields is None:
        raise ProtocolError(f"not a reset of the protocol (docs/protocol.md): {frame.data[:200]!r}")
    # The reset's own id is its position; the body says the same.
    cursor = frame.id if frame.id is not None and _HEADER_VALUE.fullmatch(frame.id) else fields["cursor"]
    if not _HEADER_VALUE.fullmatch(cursor):
        raise ProtocolError(f"a reset without a usable cursor: {cursor[:100]!r}")
    return ClientReset(fields["reason"], cursor)


def _typed(body: dict[str, Any], **types: type | tuple[type, ...]) -> dict[str, Any] | None:
    """The named fields of `body` if each is there with its type (no bool for an int), else None."""
    fields = {name: body.get(name, ...) for name in types}
    ok = all(isinstance(fields[name], kind) and not isinstance(fields[name], bool) for name, kind in types.items())
    return fields if ok else None
