"""Publishing from any process that has `DATABASE_URL`: a task-queue worker, a script, a cron job.

    from realtime.publisher import Publisher

    with Publisher.from_env() as publisher:
        publisher.publish("run.42", "status", {"percent": 10})

No Flask app and no HTTP: it checks each message as `Realtime.publish` does
(realtime/messages.py) and appends it to the same table through the same
`MessageStore`. The servers' streams learn of it as of any other process's
append: on PostgreSQL by a NOTIFY sent after the commit (or, should that be
lost, by their safety poll within REALTIME_SAFETY_POLL_S), on SQLite by their
poll every REALTIME_POLL_S.
"""
from __future__ import annotations

import atexit
import os
import threading
from typing import Any, Mapping, Sequence

from common.database import Database, prepared_statements

from .errors import RealtimeError
from .extension import DEFAULTS
from .messages import check_batch, check_message, check_text_stream
from .names import check_idempotency_key
from .store import Message, MessageStore
from .text_streams import TextFlusher, TextStream

DEFAULT_MAX_MESSAGE_BYTES = DEFAULTS["REALTIME_MAX_MESSAGE_BYTES"]  # the app's own default (docs/protocol.md §2)


class PublisherConfigError(RealtimeError):
    """The environment does not say where to publish."""


class Publisher:
    """Checks and stores messages; one per process, shared by its threads."""

    def __init__(
        self, database_url: str, *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        prepared_statements: bool = True, text_flush_ms: float = DEFAULTS["REALTIME_TEXT_FLUSH_MS"],
        text_max_bytes: int = DEFAULTS["REALTIME_TEXT_MAX_BYTES"],
    ) -> None:
        self.max_message_bytes = max_message_bytes
        self.text_flush_s = text_flush_ms / 1000
        self.text_max_bytes = text_max_bytes
        self._text_flusher: TextFlusher | None = None  # made by the first text stream
        self._flusher_lock = threading.Lock()
        self._db = Database(database_url, prepared_statements=prepared_statements)
        self.store = MessageStore(self._db)
        # On PostgreSQL one NOTIFY after commits, from a background thread; on SQLite others poll.
        self._notifier = self.store.notifier()
        self._committed = self._notifier.poke if self._notifier is not None else None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Publisher:
        """Configured as the app is: `DATABASE_URL`, and `FLASK_REALTIME_MAX_MESSAGE_BYTES`,
        `FLASK_REALTIME_TEXT_FLUSH_MS`, `FLASK_REALTIME_TEXT_MAX_BYTES`, `REALTIME_LISTEN_URL`,
        `FLASK_DATABASE_PREPARED_STATEMENTS` when the app has them."""
        url = environ.get("DATABASE_URL")
        if not url:
            raise PublisherConfigError(
                "DATABASE_URL is not set: set it to the database the realtime server uses "
                "(e.g. postgresql+psycopg://user@host/db)", code="missing_database_url",
            )
        config = {
            "DATABASE_URL": url,
            "REALTIME_LISTEN_URL": environ.get("REALTIME_LISTEN_URL"),
            "DATABASE_PREPARED_STATEMENTS": environ.get("FLASK_DATABASE_PREPARED_STATEMENTS", "auto"),
        }
        max_bytes = int(environ.get("FLASK_REALTIME_MAX_MESSAGE_BYTES", DEFAULT_MAX_MESSAGE_BYTES))
        return cls(
            url, max_message_bytes=max_bytes, prepared_statements=prepared_statements(config),
            text_flush_ms=float(environ.get("FLASK_REALTIME_TEXT_FLUSH_MS", DEFAULTS["REALTIME_TEXT_FLUSH_MS"])),
            text_max_bytes=int(environ.get("FLASK_REALTIME_TEXT_MAX_BYTES", DEFAULTS["REALTIME_TEXT_MAX_BYTES"])),
        )

    def publish(
        self, channel: str, topic: str, data: Any, *, run_id: str | None = None, idempotency_key: str | None = None,
    ) -> Message:
        """Store one message (see `Realtime.publish`); a bad one raises a `RealtimeError`, storing nothing."""
        if idempotency_key is not None:
            check_idempotency_key(idempotency_key)
        new = check_message(channel, topic, data, run_id, max_bytes=self.max_message_bytes)
        return self.store.append(
            new.channel, new.topic, new.data_json, run_id=new.run_id,
            on_commit=self._committed, idempotency_key=idempotency_key,
        )

    def publish_many(self, messages: Sequence[Mapping[str, Any]]) -> list[Message]:
        """Store 1-1000 messages in one transaction, ids in list order (see `Realtime.publish_many`)."""
        checked = check_batch(messages, max_bytes=self.max_message_bytes)
        return self.store.append_many(checked, on_commit=self._committed)

    def text_stream(self, channel: str, topic: str, id: str | None = None, *, run_id: str | None = None) -> TextStream:
        """A text stream to write from a task (see `Realtime.text_stream`; docs/protocol.md §11):

            with publisher.text_stream(f"run.{task_id}", "answer") as out:
                for piece in llm_answer(prompt):
                    out.write(piece)
        """
        with self._flusher_lock:
            if self._text_flusher is None:
                self._text_flusher = TextFlusher(
                    lambda items: self.store.append_many(items, on_commit=self._committed),
                    newer_starts=self.store.newer_text_starts, interval_s=self.text_flush_s,
                )
        return TextStream(
            self._text_flusher, *check_text_stream(channel, topic, id, run_id), run_id=run_id,
            max_bytes=self.text_max_bytes,
        )

    def close(self) -> None:
        """Store what text streams wrote, send the last NOTIFY, then release the database connections."""
        if self._text_flusher is not None:
            self._text_flusher.close()
        if self._notifier is not None:
            self._notifier.close()
        self._db.dispose()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


_shared: tuple[int, Publisher] | None = None
_shared_lock = threading.Lock()


def shared_publisher() -> Publisher:
    """This process's `Publisher.from_env()`, made at first use and made again in a forked
    child (a Celery or RQ worker forks): a pool's connections must never cross a fork."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared[0] != os.getpid():
            _shared = (os.getpid(), Publisher.from_env())
            atexit.register(_shared[1].close)  # a script's last NOTIFY goes out before it exits
        return _shared[1]
