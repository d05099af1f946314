"""`flask realtime ...`: watch a channel's raw frames, prune old messages."""
from __future__ import annotations

import sys

import click
from flask import current_app
from flask.cli import AppGroup

group = AppGroup("realtime", help="Realtime channels: tail a stream, prune history.")


@group.command("tail")
@click.argument("channel")
@click.option("--topic", "topics", multiple=True, help="Only this topic (repeatable). Default: all.")
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
    """The same frames, read through realtime.client: it resumes with its cursor after every disconnect,
    so the output has no gap and no repeat (a token it fetched itself is fetched again when it expires)."""
    from common import jsontext

    from .client import ClientError, ClientReset, subscribe, token_from
    from .sse import message_frame, reset_frame
    from .store import Message

    if token is None and not topics:
        raise click.UsageError("with --url, name the topics (--topic T ...): the server's token names them")

    def write(frame: bytes) -> None:
        sys.stdout.buffer.write(frame)
        sys.stdout.buffer.flush()

    def on_reset(reset: ClientReset) -> None:
        write(reset_frame(reset.reason, reset.cursor))

    source = token if token is not None else token_from(url, channel, topics)
    messages = subscribe(url, source, last_event_id=last_event_id, on_reset=on_reset,
                         topics=topics if token is not None else None)
    try:
        for m in messages:
            # The server's own bytes: its envelope around the data as the store encodes it.
            envelope = Message(m.id, m.channel, m.topic, jsontext.encode(m.data), m.run_id, m.created_at).envelope_json()
            write(message_frame(m.cursor, m.topic, envelope))
    except ClientError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass
    finally:
        messages.close()


@group.command("prune")
def prune() -> None:
    """Delete messages older than REALTIME_RETENTION_S now (it also runs on a schedule)."""
    removed = current_app.extensions["realtime"].prune()
    click.echo(f"pruned {removed} messages")
