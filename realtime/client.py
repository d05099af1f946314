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

The wire format is read by httpx-sse, which splits lines as the SSE spec says
(only CR, LF, CRLF), so no character inside a `data:` line can cut a frame.
"""
from __future__ import annotations

import inspect
import json
import random
import socket
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

import httpx
from httpx_sse import EventSource, ServerSentEvent

SUBSCRIBE_PATH = "/api/realtime/subscribe"
TOKEN_PATH = "/api/realtime/token"

#: A token, or what returns a fresh one: a string, or a grant `{"token", ...}` as POST /api/realtime/token answers.
TokenSource = Union[str, Callable[[], Union[str, Mapping[str, Any]]]]


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


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter, for network errors and 5xx answers."""

    initial_s: float = 0.5
    max_s: float = 30.0

    def delay(self, failures: int) -> float:
        return random.uniform(0, min(self.max_s, self.initial_s * 2 ** max(0, failures - 1)))


class ClientSubscription:
    """An iterator of `ClientMessage`s that never ends by itself; `close()` ends it, from any thread."""

    def __init__(
        self,
        base_url: str,
        token: TokenSource,
        *,
        last_event_id: str | None = None,
        topics: Sequence[str] | None = None,
        on_reset: Callable[[ClientReset], None] | None = None,
        backoff: Backoff = Backoff(),
        read_timeout_s: float = 60.0,
        client: httpx.Client | None = None,
    ) -> None:
        if not isinstance(token, str) and not callable(token):
            raise TypeError("token must be a string or a callable that returns one")
        self.url = base_url.rstrip("/") + SUBSCRIBE_PATH
        self._token_source = token
        self._token: str | None = token if isinstance(token, str) else None
        self._token_is_new = False  # fetched for this very request: a 401 then is not about expiry
        #: Where the stream stands: pass it as `last_event_id` to resume in another process.
        self.cursor = last_event_id
        self.topics = list(topics) if topics else None  # narrows the token's topics (?topic=)
        self.on_reset = on_reset
        self.last_reset: ClientReset | None = None
        self.backoff = backoff
        # A dead peer sends no FIN: without keep-alives for this long, reconnect (the server sends
        # one every REALTIME_HEARTBEAT_S, 15 s by default).
        self._client = client or httpx.Client(timeout=httpx.Timeout(10.0, read=read_timeout_s))
        self._owns_client = client is None
        self._closed = threading.Event()
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
                            failures = 0
                            self._socket = response.extensions["network_stream"].get_extra_info("socket")
                            for sse in EventSource(response).iter_sse():
                                if sse.retry is not None:
                                    retry_s = sse.retry / 1000
                                item = self._item(sse)
                                if item is not None:
                                    yield item
                            wait_s = random.uniform(retry_s / 2, retry_s)  # ended by the server (shutdown)
                        elif wait_s == 0:
                            continue  # a new token: at once
                        else:
                            failures += 1
                except httpx.TransportError:
                    failures += 1
                    wait_s = self.backoff.delay(failures)
                finally:
                    self._socket = None
                self._closed.wait(wait_s)
        finally:
            self._release()

    def _request(self) -> dict[str, Any]:
        self._token_is_new = self._token is None
        if self._token is None:
            self._token = _token_text(self._token_source())
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "text/event-stream"}
        if self.cursor is not None:
            headers["Last-Event-ID"] = self.cursor
        return {"headers": headers, "params": {"topic": self.topics} if self.topics else None}

    def _wait_after(self, response: httpx.Response, failures: int) -> float | None:
        """None to read the stream; else seconds to wait before the next try; or raise."""
        status = response.status_code
        if status == 200:
            content_type = response.headers.get("content-type", "")
            if not content_type.startswith("text/event-stream"):
                raise SubscribeRefused(status, "not_an_event_stream",
                                       f"{self.url} answered {content_type!r}: is the base URL right?")
            return None
        body = response.read()
        if status == 401 and not isinstance(self._token_source, str) and not self._token_is_new:
            self._token = None  # expired (tokens only open streams for a while): ask the callable again
            return 0
        if status in (429, 503) and response.headers.get("retry-after", "").isdigit():
            return float(response.headers["retry-after"])
        if status >= 500 or status == 429:
            return self.backoff.delay(failures + 1)
        code, message = _error_of(body)
        if status == 401 and isinstance(self._token_source, str):
            message += " (a token given as a string cannot be renewed: pass a callable that fetches a fresh one)"
        raise SubscribeRefused(status, code, message)

    def _item(self, sse: ServerSentEvent) -> ClientMessage | None:
        if not sse.data:
            return None  # the `retry:` frame
        if sse.event == "reset":
            body = json.loads(sse.data)
            reset = ClientReset(body["reason"], body["cursor"])
            self.cursor = sse.id or reset.cursor
            self.last_reset = reset
            if self.on_reset is not None:
                self.on_reset(reset)
            return None
        envelope = json.loads(sse.data)
        self.cursor = sse.id
        return ClientMessage(
            id=envelope["id"], cursor=sse.id, channel=envelope["channel"], topic=envelope["topic"],
            data=envelope["data"], run_id=envelope["run_id"],
            created_at=datetime.fromisoformat(envelope["created_at"]),
        )

    def _release(self) -> None:
        if self._owns_client:
            self._client.close()


def subscribe(base_url: str, token: TokenSource, *, last_event_id: str | None = None, **options: Any) -> ClientSubscription:
    """Subscribe to the channel and topics `token` names; see `ClientSubscription` for the options."""
    return ClientSubscription(base_url, token, last_event_id=last_event_id, **options)


def token_from(base_url: str, channel: str, topics: Sequence[str], *, timeout_s: float = 10.0) -> Callable[[], str]:
    """A token callable that asks the server's POST /api/realtime/token (its authorization policy decides)."""
    url = base_url.rstrip("/") + TOKEN_PATH

    def fetch() -> str:
        response = httpx.post(url, json={"channel": channel, "topics": list(topics)}, timeout=timeout_s)
        if response.status_code != 200:
            raise SubscribeRefused(response.status_code, *_error_of(response.content))
        return response.json()["token"]

    return fetch


def _token_text(value: str | Mapping[str, Any]) -> str:
    token = value.get("token") if isinstance(value, Mapping) else value
    if not isinstance(token, str) or not token:
        raise TypeError(f"the token callable must return a token string or a grant {{'token': ...}}, not {value!r}")
    return token


def _error_of(body: bytes) -> tuple[str, str]:
    """(code, message) of a docs/protocol.md §3 JSON error, or a stand-in for a body that is not one."""
    try:
        error = json.loads(body)["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return "http_error", body[:200].decode(errors="replace") or "(no body)"
