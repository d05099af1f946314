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
def tail(channel: str, topics: tuple[str, ...], last_event_id: str | None) -> None:
    """Print CHANNEL's frames exactly as a subscriber receives them, until Ctrl-C."""
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


@group.command("prune")
def prune() -> None:
    """Delete messages older than REALTIME_RETENTION_S now (it also runs on a schedule)."""
    removed = current_app.extensions["realtime"].prune()
    click.echo(f"pruned {removed} messages")
