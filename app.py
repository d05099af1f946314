"""The Flask application: realtime channels over SSE, background jobs, the demo.

`create_app()` follows the Flask tutorial's order: defaults, then the
environment, then the caller's overrides, then each extension's `init_app`,
then every blueprint and command group, registered here and only here.
"""
from __future__ import annotations

import logging
import os
import secrets
from typing import Any, Mapping

import click
from flask import Flask
from flask.cli import run_command

from common import errors, health, logs, metrics, request_input
from common.config import flag
from common.database import DatabaseUnavailable, database_for
from demo import Demo
from demo import views as demo_views
from demo import workshop as demo_workshop
from jobs import Jobs
from jobs import cli as jobs_cli
from jobs import views as jobs_views
from realtime import Realtime
from realtime import cli as realtime_cli
from realtime import views as realtime_views

log = logging.getLogger(__name__)

SECRET_KEYS = ("SECRET_KEY", "REALTIME_PUBLISH_KEY", "JOBS_EVENT_KEY", "METRICS_KEY")


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    app = Flask(__name__, instance_relative_config=True)
    app.json.sort_keys = False  # keep envelopes in the order of docs/protocol.md §6
    os.makedirs(app.instance_path, exist_ok=True)

    app.config["DATABASE_URL"] = "sqlite:///" + os.path.join(app.instance_path, "realtime.sqlite3")
    # The demo page, its report job and its allow-all token policy: on under
    # `flask run` (what `make run` starts), off unless asked for anywhere else.
    app.config["DEMO_ENABLED"] = _served_by_flask_run()
    # instance/config.py (the Flask tutorial's place for a local SECRET_KEY;
    # `make run` writes one), then the environment, which wins.
    app.config.from_pyfile("config.py", silent=True)
    for key in ("DATABASE_URL", "SECRET_KEY", "METRICS_KEY", "REALTIME_LISTEN_URL"):
        if os.environ.get(key):
            app.config[key] = os.environ[key]
    # FLASK_REALTIME_HEARTBEAT_S=1 -> REALTIME_HEARTBEAT_S = 1 (values parsed as JSON).
    app.config.from_prefixed_env()
    for key in SECRET_KEYS:  # ... but a key is text, even FLASK_REALTIME_PUBLISH_KEY=12345
        if f"FLASK_{key}" in os.environ:
            app.config[key] = os.environ[f"FLASK_{key}"]
    if config:
        app.config.update(config)
    _require_secret_key(app)
    demo_enabled = flag(app.config["DEMO_ENABLED"])

    logs.configure()  # LOG_FORMAT=json: one JSON object per line
    logs.init_app(app)
    errors.init_app(app)
    request_input.init_app(app)  # no POST from another site's page (issue 17, item 11)
    realtime = Realtime(app)
    jobs = Jobs(app, realtime=realtime)
    if demo_enabled:
        # The demo lets anyone subscribe to any channel. A real app decides
        # here, from its own session or API key, who may watch what; with
        # the demo off and no policy, POST /api/realtime/token refuses all.
        realtime.authorize(lambda channel, topics: True)
        Demo(app, jobs=jobs)

    probes = health.Health(app)
    probes.add("database", lambda: _database_problem(app))
    probes.add("change_feed", realtime.change_feed_problem)
    probes.warn("jobs_workers", jobs.workers_problem)  # never unready for it: see common/health.py

    app.register_blueprint(health.blueprint)
    app.register_blueprint(metrics.blueprint)
    app.register_blueprint(realtime_views.blueprint)
    app.register_blueprint(jobs_views.blueprint)
    if demo_enabled:
        app.register_blueprint(demo_views.blueprint)
        app.register_blueprint(demo_workshop.blueprint)  # the spec lab at /workshop
    app.cli.add_command(realtime_cli.group)
    app.cli.add_command(jobs_cli.group)
    return app


def _served_by_flask_run() -> bool:
    """Whether Flask's development server is loading this app (`flask run`, `make run`).

    The demo hands out tokens for every channel and starts jobs for anyone, so
    only the command made for trying the project turns it on by itself:
    gunicorn, tests and the other `flask` commands (jobs worker, tail) get it
    only with DEMO_ENABLED (issue 17, item 10). `flask run` loads the app
    inside its own click command, also in the reloader's child process.
    """
    context = click.get_current_context(silent=True)
    return context is not None and context.command is run_command


def _loaded_by_a_command() -> bool:
    """Whether a `flask` command other than `flask run` is loading the app: it serves no request."""
    context = click.get_current_context(silent=True)
    return context is not None and context.command is not run_command


def _database_problem(app: Flask) -> str | None:
    try:
        database_for(app).ping(timeout_s=2.0)  # /readyz turns 503 within seconds of a stall
    except DatabaseUnavailable as exc:
        return exc.message
    return None


def _require_secret_key(app: Flask) -> None:
    if app.config.get("SECRET_KEY"):
        return
    if app.debug or app.testing or _loaded_by_a_command():
        # Tokens signed with a throwaway key die with the process; the client
        # then asks for a new one. Good enough for `flask run --debug`, tests,
        # and commands that serve no request: `flask realtime tail --url` only
        # reads another server (issue 19, item 7), `flask jobs worker` signs no token.
        app.config["SECRET_KEY"] = secrets.token_hex(32)
        log.warning("SECRET_KEY is not set; using a random key for this process only")
        return
    raise RuntimeError(
        "SECRET_KEY must be set outside debug and testing: export SECRET_KEY=... "
        f"or put SECRET_KEY = '...' in {os.path.join(app.instance_path, 'config.py')} (make run writes one)"
    )
