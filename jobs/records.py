"""What the job store returns: frozen values, never ORM rows, and the run statuses."""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

from .types import JSON

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = "queued", "running", "completed", "failed", "cancelled"
FINISHED = (COMPLETED, FAILED, CANCELLED)

ID_PATTERN = re.compile(r"[0-9a-f]{16}")


def new_id() -> str:
    return secrets.token_hex(8)


def is_id(text: str) -> bool:
    """Shaped like an id we issue. Checked before any lookup by a client's id,
    so a NUL or an unencodable character never reaches a query (PostgreSQL
    refuses NUL in text with an error, not with "no such row")."""
    return isinstance(text, str) and ID_PATTERN.fullmatch(text) is not None


@dataclass(frozen=True)
class Event:
    id: str
    name: str
    data: dict[str, JSON]
    created_at: datetime


@dataclass(frozen=True)
class NewEvent:
    """An event to store, with the ids of the functions it starts."""

    name: str
    data_json: str
    function_ids: Sequence[str]


@dataclass(frozen=True)
class Step:
    id: str
    status: str
    attempts: int
    output: JSON
    error: str | None


@dataclass(frozen=True)
class Run:
    id: str
    function_id: str
    event_id: str
    status: str
    attempt: int
    output: JSON
    error: str | None
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    steps: tuple[Step, ...] = ()

    @property
    def channel(self) -> str:
        return f"run.{self.id}"


@dataclass(frozen=True)
class Claim:
    """A run held by one worker: every write for it is fenced by `token`."""

    run: Run
    token: str
    lease_s: float
    after_crash: bool = False  # its last worker died (or stalled) mid-run: the lease lapsed


class LeaseLost(BaseException):
    """The worker no longer holds the run (its lease lapsed and another worker took it).

    A BaseException, like the step interrupts, so job code's `except Exception`
    cannot swallow it.
    """
