"""`flask realtime ...`: watch a channel's raw frames, prune old messages."""
from __future__ import annotations

import sys
from typing import Callable, Iterator

import click
import httpx
from flask import current_app
from flask.cli import AppGroup

group = AppGroup("realtime", help="Realtime channels: tail a stream, prune history.")


@group.command("tail")
@click.argument("channel")
@click.option(
    "--topic", "topics", multiple=True,
    help="Only this topic (repeatable). Default: all. With --url: the topics of --token; without"
    " --token, name them (a token names its topics, and none covers all).",
)
@click.option("--last-event-id", default=None, help="Resume after this cursor, like a reconnecting client.")
@click.option("--url", default=None, help="Watch a remote server over HTTP (e.g. https://example.org) instead of this app's database.")
@click.option("--token", default=None, help="With --url: a subscription token. Default: ask URL/api/realtime/token.")
def tail(channel: str, topics: tuple[str, ...], last_event_id: str | None, url: str | None, token: str | None) -> None:
    """Print CHANNEL's frames exactly as a subscriber receives them, until Ctrl-C."""
    if url is not None:
        _tail_remote(url, channel, topics, last_event_id, token)
        return
    if token is not None:
        raise click.UsageError("--token is for --url: the local tail reads the database, no token needed")
    from .errors import RealtimeError

    realtime = current_app.extensions["realtime"]
    try:
        frames = realtime.stream(channel, list(topics) or None, last_event_id)
    except RealtimeError as exc:
        raise click.UsageError(exc.message) from None
    try:
        for frame in frames:
            sys.stdout.buffer.write(frame)
            sys.stdout.buffer.flush()
    except KeyboardInterrupt:
        pass
    finally:
        frames.close()
        realtime.shutdown()


def _tail_remote(url: str, channel: str, topics: tuple[str, ...], last_event_id: str | None, token: str | None) -> None:
    """The server's frames as they arrive, `retry:` and keep-alives included, read through
    realtime.client: it resumes with its cursor after every disconnect, so the output has no
    gap and no repeat (a token it fetched itself is fetched again when it expires)."""
    from .client import ClientError, subscribe, token_from

    if token is None and not topics:
        raise click.UsageError("with --url, name the topics (--topic T ...): the server's token names them")

    def write(frame: bytes) -> None:
        sys.stdout.buffer.write(frame)
        sys.stdout.buffer.flush()

    source = token if token is not None else token_from(url, channel, topics)
    # The timeouts the client gives itself: a read waits a minute, for the keep-alives.
    wire = httpx.Client(transport=FrameTap(write), timeout=httpx.Timeout(10.0, read=60.0))
    messages = subscribe(url, source, last_event_id=last_event_id, client=wire,
                         topics=topics if token is not None else None)
    try:
        for _ in messages:  # the tap wrote each message's frame already
            pass
    except ClientError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass
    finally:
        messages.close()
        wire.close()


class FrameTap(httpx.HTTPTransport):
    """Hands each whole frame of an event stream to `write`, as the server sent it.

    realtime.client reads a stream's frames and keeps only messages; the tail
    shows what a subscriber receives, so it taps the bytes beneath the client.
    A frame cut by a disconnect is never written: the client resumes after the
    last whole one, and the server sends the cut one again.
    """

    def __init__(self, write: Callable[[bytes], None]) -> None:
        super().__init__()
        self.write = write

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if response.status_code == 200 and response.headers.get("content-type", "").startswith("text/event-stream"):
            response.stream = _Frames(response.stream, self.write)
        return response


class _Frames(httpx.SyncByteStream):
    def __init__(self, stream: httpx.SyncByteStream, write: Callable[[bytes], None]) -> None:
        self.stream = stream
        self.write = write

    def __iter__(self) -> Iterator[bytes]:
        pending = b""
        for chunk in self.stream:
            # This project's frames end with LF LF (realtime/sse.py), and never hold one.
            *frames, pending = (pending + chunk).split(b"\n\n")
            for frame in frames:
                self.write(frame + b"\n\n")
            yield chunk

    def close(self) -> None:
        self.stream.close()


@group.command("prune")
def prune() -> None:
    """Delete messages older than REALTIME_RETENTION_S now (it also runs on a schedule)."""
    removed = current_app.extensions["realtime"].prune()
    click.echo(f"pruned {removed} messages")
