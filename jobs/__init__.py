"""Durable background jobs whose functions publish progress over realtime channels.

    send(name, data) ──> store: event + queued runs ──> worker: claim, lease ──> runner: execute
                                                                                    │
                     run.<run_id> (status, log, run) <── ctx.publish / lifecycle <──┘

Modules, one idea each: `registry` (functions and their triggers), `store`
(the only SQL: events, runs, steps, files; claims, leases, fencing), `steps`
(what a function sees: `ctx.step.run`, `ctx.step.sleep`, `ctx.publish`),
`runner` (one execution and its outcome: retry, fail, cancel), `worker`
(threads, the claim loop, lease renewal, eager mode), `extension` (the Flask
extension and Python API), `views` (HTTP), `cli` (`flask jobs worker`),
`report` (the demo's report job and its PDF).
"""
from .errors import JobError, NonRetriableError
from .extension import Jobs
from .registry import JobFunction, function
from .steps import Context

__all__ = ["Context", "JobError", "JobFunction", "Jobs", "NonRetriableError", "function"]
