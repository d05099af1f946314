"""The demo's job: `generate-report` on `report.requested`, and its three steps.

    POST /api/events {"name": "report.requested", "data": {"title": "Q3", "days": 30}}

Progress on channel `run.<run_id>`: topic `status` ({"stage", "percent"}, the
last one with the report's `url`) and topic `log`; the run's lifecycle on
topic `run` comes from the runner. Three durable steps (fetch, process,
generate) take `DEMO_REPORT_STEP_S` each; the data is synthetic and seeded,
the PDF real, kept in the database and served at `GET /reports/<run_id>`.
"""
from __future__ import annotations

import random
import time
from datetime import date, timedelta
from typing import Any

from flask import current_app

from common.errors import PublicError
from jobs import Context, NonRetriableError, function

from .pdf import render_pdf

REPORT_FILE = "report.pdf"
REGIONS = ("North", "South", "East", "West")


class InvalidReportRequest(NonRetriableError, PublicError):
    """Parameters no retry can fix, in a message for the person who asked: the page shows it."""


@function(id="generate-report", trigger="report.requested", retries=3)
def generate_report(ctx: Context) -> dict[str, Any]:
    title, days, seed = _parameters(ctx.event.data, default_seed=ctx.event.id)
    pause_s = float(current_app.config["DEMO_REPORT_STEP_S"])

    ctx.publish(ctx.channel, "status", {"stage": "fetching", "percent": 10})
    ctx.publish(ctx.channel, "log", {"level": "info", "message": f"Fetching {days} days of orders"})
    orders = ctx.step.run("fetch", fetch_orders, seed, days, pause_s)

    ctx.publish(ctx.channel, "status", {"stage": "processing", "percent": 40})
    ctx.publish(ctx.channel, "log", {"level": "info", "message": f"Summarizing {len(orders)} order rows"})
    summary = ctx.step.run("process", summarize, orders, pause_s)

    ctx.publish(ctx.channel, "status", {"stage": "generating", "percent": 70})
    ctx.publish(ctx.channel, "log", {"level": "info", "message": "Rendering the PDF"})
    pdf = ctx.step.run("generate", render_and_save, ctx.run_id, title, summary, pause_s)

    url = f"/reports/{ctx.run_id}"
    ctx.publish(ctx.channel, "log", {"level": "info", "message": f"Report ready: {pdf['pages']} page(s), {pdf['bytes']} bytes"})
    ctx.publish(ctx.channel, "status", {"stage": "done", "percent": 100, "url": url})
    return {"url": url, **pdf}


def _parameters(data: dict[str, Any], default_seed: str) -> tuple[str, int, Any]:
    title = data.get("title", "Sales report")
    days = data.get("days", 30)
    if not isinstance(title, str) or not 0 < len(title) <= 100:
        raise InvalidReportRequest("'title' must be a string of 1-100 characters")
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 366:
        raise InvalidReportRequest("'days' must be an integer from 1 to 366")
    return title, days, data.get("seed", default_seed)


# -- the steps ------------------------------------------------------------------


def fetch_orders(seed: Any, days: int, pause_s: float) -> list[dict[str, Any]]:
    """Synthetic daily orders per region: a stand-in for a slow query or API."""
    time.sleep(pause_s)
    rng = random.Random(str(seed))
    start = date(2026, 1, 1)
    return [
        {
            "day": (start + timedelta(days=i)).isoformat(),
            "region": region,
            "orders": (orders := rng.randint(20, 120)),
            "revenue": round(orders * rng.uniform(18.0, 42.0), 2),
        }
        for i in range(days)
        for region in REGIONS
    ]


def summarize(orders: list[dict[str, Any]], pause_s: float) -> dict[str, Any]:
    time.sleep(pause_s)
    by_region = {r: {"orders": 0, "revenue": 0.0} for r in REGIONS}
    by_day: dict[str, float] = {}
    for row in orders:
        by_region[row["region"]]["orders"] += row["orders"]
        by_region[row["region"]]["revenue"] += row["revenue"]
        by_day[row["day"]] = by_day.get(row["day"], 0.0) + row["revenue"]
    return {
        "regions": [{"region": r, "orders": v["orders"], "revenue": round(v["revenue"], 2)} for r, v in by_region.items()],
        "days": [{"day": d, "revenue": round(v, 2)} for d, v in by_day.items()],
        "orders": sum(v["orders"] for v in by_region.values()),
        "revenue": round(sum(v["revenue"] for v in by_region.values()), 2),
    }


def render_and_save(run_id: str, title: str, summary: dict[str, Any], pause_s: float) -> dict[str, int]:
    time.sleep(pause_s)
    content, pages = render_pdf(title, run_id, summary)
    current_app.extensions["demo"].files.save(run_id, REPORT_FILE, "application/pdf", content)
    return {"pages": pages, "bytes": len(content)}
