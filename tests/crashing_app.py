"""The demo app plus a job whose step kills its worker process, as a segfault or the OOM killer would.

    flask --app tests.crashing_app jobs worker
"""
from __future__ import annotations

import os
from typing import Any, Mapping

from flask import Flask

from app import create_app as create_demo_app
from jobs import Context, function


@function(id="crash-worker", trigger="test.crash", retries=0)
def crash_worker(ctx: Context) -> None:
    # os._exit ends the process at once: no exception, no finally, no handing back.
    ctx.step.run("exit", os._exit, 1)


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    app = create_demo_app(config)
    app.extensions["jobs"].register(crash_worker)
    return app
