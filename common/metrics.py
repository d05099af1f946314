"""`GET /metrics`: Prometheus metrics, summed over the worker processes of an instance.

gunicorn.conf.py points `PROMETHEUS_MULTIPROC_DIR` at a fresh directory before
it forks the workers; prometheus_client then keeps each process's samples in
files there, and whichever worker answers a scrape adds them all up (its
`MultiProcessCollector`). Without that variable (`flask run`, a standalone
`flask jobs worker`) the process's own registry is served.

The metrics themselves live beside the code they count (realtime/metrics.py,
jobs/metrics.py), with no channel, topic or run id as a label: those are
unbounded, and each label value is a time series forever.
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .errors import AppError
from .request_input import bearer_matches

blueprint = Blueprint("metrics", __name__)

#: Collectors that compute their samples at scrape time, from the database
#: say (`jobs_runs_due`); registered by the extensions, keyed by name.
ScrapeCollector = Callable[[], Iterable]


class InvalidMetricsKey(AppError):
    status = 401
    code = "invalid_metrics_key"


class ScrapeTime(Collector):
    """Adapts the app's scrape-time collectors to prometheus_client's registry."""

    def __init__(self, collectors: Iterable[ScrapeCollector]) -> None:
        self._collectors = list(collectors)

    def collect(self) -> Iterable:
        for collector in self._collectors:
            yield from collector()


def registry(scrape_time: Iterable[ScrapeCollector] = ()) -> CollectorRegistry:
    """Every process's samples (multiprocess mode) or this process's, plus the scrape-time ones."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        combined = CollectorRegistry()
        MultiProcessCollector(combined)
    else:
        combined = CollectorRegistry()
        combined.register(_Everything())
    combined.register(ScrapeTime(scrape_time))
    return combined


class _Everything(Collector):
    def collect(self) -> Iterable:
        yield from REGISTRY.collect()


def scrape_collectors(app) -> list[ScrapeCollector]:  # noqa: ANN001
    return app.extensions.setdefault("metrics", [])


def add_scrape_collector(app, collector: ScrapeCollector) -> None:  # noqa: ANN001
    scrape_collectors(app).append(collector)


@blueprint.get("/metrics")
def metrics() -> Response:
    key = current_app.config.get("METRICS_KEY")
    if key and not bearer_matches(key):
        raise InvalidMetricsKey("/metrics needs 'Authorization: Bearer <METRICS_KEY>'")
    body = generate_latest(registry(scrape_collectors(current_app)))
    return Response(body, mimetype=CONTENT_TYPE_LATEST)


def serve(port: int, scrape_time: Iterable[ScrapeCollector] = ()) -> None:
    """Serve this process's metrics on `port` from a thread (`flask jobs worker --metrics-port`)."""
    start_http_server(port, registry=registry(scrape_time))
