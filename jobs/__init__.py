"""Durable background jobs whose functions publish progress over realtime channels.

    send(name, data) ──> runs: event + queued runs ──> worker: claim, lease ──> runner: execute
                                                                                   │
                     run.<run_id> (run topic) <── lifecycle / ctx.publish <── steps, journal

Modules, one idea each: `registry` (functions and their triggers), `records`
(the values the stores return), `tables` (the schema), `runs` (the queue:
events in; claims, leases, fencing, outcomes), `journal` (what each step did),
`steps` (what a function sees: `ctx.step.run`, `ctx.step.sleep`,
`ctx.publish`, `ctx.text_stream`), `cancels` (how a cancel reaches a text stream's write),
`capabilities` (run-scoped cancel tokens), `runner` (one execution and its outcome), `worker` (threads,
the claim loop, lease renewal, retention's schedule, eager mode), `extension`
(the Flask extension and Python API), `metrics` (what /metrics shows of runs),
`views` (HTTP), `cli` (`flask jobs worker`, `flask jobs prune`).
"""
from .errors import JobError, NonRetriableError
from .extension import Jobs
from .registry import JobFunction, function
from .steps import Cancelled, Context

__all__ = ["Cancelled", "Context", "JobError", "JobFunction", "Jobs", "NonRetriableError", "function"]
