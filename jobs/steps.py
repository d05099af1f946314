"""What a job function sees: `ctx`, with durable steps and exactly-once publishing.

    def generate_report(ctx):
        ctx.publish(ctx.channel, "status", {"stage": "fetching", "percent": 10})
        rows = ctx.step.run("fetch", fetch_rows, ctx.event.data)
        ctx.step.sleep("cool-down", 5)

A function runs again from the top after a failure or a crash; what makes that
safe is memoization (Inngest's model):

- `step.run(id, fn, *args)` runs `fn` once and stores its JSON result; later
  executions of the run return the stored result without calling `fn`.
- `step.sleep(id, seconds)` records a wake-up time and hands the run back;
  no thread waits, and the run resumes there once the time has come.
- `ctx.publish(...)` is a step of its own, written in the same transaction as
  its message: resumed runs never repeat a message. Its id says where it was
  called from: `publish:1`, `publish:2`, ... count the publishes of the
  function's own code in call order, `fetch/publish:1`, ... those made inside
  step `fetch`'s code. A replay skips a completed step's code, publishes and
  all, so publishes are counted per step: skipping one step never shifts the
  ids of the publishes after it, which would make a later message look already
  sent (issue 17, item 3). A function must make the same calls in the same
  order each time, which memoized steps ensure.
- A step that fails and runs again publishes once per id: its retry skips the
  publishes an earlier attempt stored (matched by position within the step,
  not by content) and publishes those past them.
- `DatabaseUnavailable` (the app's database is away, stalled or locked) is no
  failure of a step: it is not recorded, and the runner hands the run back
  without counting the step's attempt (runner.py).

Each step is also a boundary where a cancelled run, or a stopping worker,
stops (docs/protocol.md §4: "the run stops before its next step").
"""
from __future__ import annotations

import json
import re
from collections import Counter
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Callable, Protocol

from sqlalchemy.orm import Session

from common import jsontext
from common.database import DatabaseUnavailable
from common.errors import describe

from .errors import NonRetriableError
from .journal import StepJournal
from .records import COMPLETED, Claim, Event, Step
from .types import JSON

if TYPE_CHECKING:
    from .cancels import CancelWatch

STEP_ID_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,100}")


class PublishFunction(Protocol):
    """`Realtime.publish`: the only way jobs write messages (never the table itself)."""

    def __call__(self, channel: str, topic: str, data: Any, *, run_id: str | None = ..., session: Session | None = ...) -> Any: ...


class TextStreams(Protocol):
    """`Realtime`'s text streams (realtime/text_streams.py), as jobs use them."""

    def text_stream(
        self, channel: str, topic: str, id: str | None = ..., *, run_id: str | None = ...,
        interrupt: Callable[[], None] | None = ..., cancel_errors: tuple[type[BaseException], ...] = ...,
    ) -> Any: ...

    def end_interrupted_text_streams(self, run_id: str) -> int: ...


class Interrupt(BaseException):
    """A step boundary telling the runner to stop executing the function.

    BaseException so that job code's `except Exception:` cannot swallow it.
    """


class Cancelled(Interrupt):
    """The run was cancelled (`POST /api/runs/<id>/cancel`): raised at its next step boundary,
    or by the next write of one of its text streams (`ctx.text_stream`). Let it propagate:
    the run ends `cancelled`."""


class Suspended(Interrupt):
    """A sleep handed the run back; it becomes due again at `until`."""

    def __init__(self, until: datetime) -> None:
        super().__init__(until)
        self.until = until


class WorkerStopping(Interrupt):
    pass


def to_json(value: JSON, what: str) -> str:
    try:
        return jsontext.encode(value)
    except jsontext.NotJSON as exc:
        # The same value comes back on every retry: retrying cannot help.
        raise NonRetriableError(f"{what} must be JSON-serializable: {exc}") from None


class Steps:
    """`ctx.step`: durable steps of one execution of a run."""

    def __init__(
        self,
        journal: StepJournal,
        claim: Claim,
        done: dict[str, Step],
        stopping: Callable[[], bool],
    ) -> None:
        self._journal = journal
        self._claim = claim
        self._done = done
        self._stopping = stopping
        self._used: set[str] = set()
        # Steps started by this execution and not ended, each with what the
        # journal held of it before (None: nothing), for a hand back (runner.py).
        self.in_progress: dict[str, Step | None] = {}
        self._running: list[str] = []  # the steps whose code is executing, innermost last
        self._effects: Counter[tuple[str | None, str]] = Counter()  # (step or None, kind) -> effects so far

    def run(self, step_id: str, fn: Callable[..., JSON], *args: Any, **kwargs: Any) -> JSON:
        """Run `fn(*args, **kwargs)` once per run; return its (stored) JSON result."""
        self._use(step_id)
        done = self._done.get(step_id)
        if done is not None and done.status == COMPLETED:
            return done.output
        self._boundary()
        self.in_progress[step_id] = done
        if not self._journal.start(self._claim, step_id):
            raise Cancelled()
        self._running.append(step_id)
        try:
            output_json = to_json(fn(*args, **kwargs), f"the result of step {step_id!r}")
        except DatabaseUnavailable:
            raise  # the moment failed, not the step: the runner hands the run back
        except Exception as exc:
            self._journal.fail(self._claim, step_id, describe(exc))
            del self.in_progress[step_id]
            raise
        finally:
            self._running.pop()
        self._journal.complete(self._claim, step_id, output_json)
        del self.in_progress[step_id]
        # What a replay would return, so both paths give the function equal values.
        return json.loads(output_json)

    def sleep(self, step_id: str, seconds: float) -> None:
        """Pause the run durably for `seconds`; the thread is free meanwhile."""
        self._use(step_id)
        done = self._done.get(step_id)
        if done is not None and done.status == COMPLETED:
            return
        now = self._journal.now()
        if done is None:
            self._boundary()
            until = now + timedelta(seconds=seconds)
            if not self._journal.sleep(self._claim, step_id, until):
                raise Cancelled()
            raise Suspended(until)
        until = datetime.fromisoformat(done.output["until"])
        if now < until:  # claimed early, e.g. by a worker whose clock runs ahead
            self._journal.runs.release(self._claim, at=until)
            raise Suspended(until)
        self._journal.complete(self._claim, step_id, json.dumps(done.output))

    def effect(self, kind: str, effect: Callable[[Session], JSON]) -> None:
        """Do `effect(session)` once per run, in the transaction that records it as done.

        Its step id counts the effects of `kind` made so far by the same code:
        `kind:N` in the function's own code, `S/kind:N` inside step S's code.
        """
        step_id = self.next_id(kind)
        if step_id in self._done:
            return
        self._boundary()
        if not self._journal.record_effect(self._claim, step_id, effect):
            raise Cancelled()

    def next_id(self, kind: str) -> str:
        """The id of the next effect of `kind` here: `kind:N` in the function's own code, `S/kind:N`
        inside step S's code, N counting from 1 in each. The same on every execution of the run."""
        scope = self._running[-1] if self._running else None
        self._effects[scope, kind] += 1
        step_id = f"{kind}:{self._effects[scope, kind]}"
        if scope is not None:
            step_id = f"{scope}/{step_id}"  # no step id chosen by job code has a '/' or ':'
        return step_id

    def _use(self, step_id: str) -> None:
        if not isinstance(step_id, str) or not STEP_ID_PATTERN.fullmatch(step_id):
            raise NonRetriableError(f"step id {step_id!r} must match {STEP_ID_PATTERN.pattern}")
        if step_id in self._used:
            raise NonRetriableError(f"step id {step_id!r} is used twice in one run; step ids must be unique")
        self._used.add(step_id)

    def _boundary(self) -> None:
        if self._stopping():
            raise WorkerStopping()


class Context:
    """The argument of every job function."""

    def __init__(
        self, claim: Claim, event: Event, publisher: PublishFunction, step: Steps,
        texts: TextStreams | None = None, cancels: CancelWatch | None = None,
    ) -> None:
        self.run_id = claim.run.id
        self.channel = claim.run.channel  # `run.<run_id>`, where the run's lifecycle is published too
        self.attempt = claim.run.attempt
        self.event = event
        self.step = step
        self._publisher = publisher
        self._texts = texts
        self._cancels = cancels

    def publish(self, channel: str, topic: str, data: JSON) -> None:
        """Publish a realtime message once per run, however often the function is resumed."""

        def publish_now(session: Session) -> JSON:
            message = self._publisher(channel, topic, data, run_id=self.run_id, session=session)
            return {"message_id": message.id}

        self.step.effect("publish", publish_now)

    def text_stream(self, channel: str, topic: str) -> Any:
        """A text stream of this run (realtime/text_streams.py), to use as a context manager:

            with ctx.text_stream(ctx.channel, "answer") as out:
                for piece in llm_answer(prompt):
                    out.write(piece)

        Its id is the same on every execution of the run (`<run_id>:S/text:N`
        inside step S, as `next_id` counts), so a step that streams, fails and
        is retried restarts the same stream: its new attempt starts from
        `{"seq": 0, "text": ""}` and the browser shows only that attempt. Text
        streamed outside a step is streamed again by every execution. Once the
        run is cancelled the next `write` raises `Cancelled` (within a second,
        cancels.py) and the stream ends `cancelled`, keeping its text.
        """
        if self._texts is None:
            raise NonRetriableError("text streams need the realtime extension (Jobs(app, realtime=...))")
        interrupt = self._cancels.watch(self.run_id) if self._cancels is not None else None
        return self._texts.text_stream(
            channel, topic, f"{self.run_id}:{self.step.next_id('text')}", run_id=self.run_id,
            interrupt=interrupt, cancel_errors=(Cancelled,),
        )
