"""The seed's report job: `generate-report` on `report.requested`, and its PDF.

    POST /api/events {"name": "report.requested", "data": {"title": "Q3", "days": 30}}

Progress on channel `run.<run_id>`: topic `status` ({"stage", "percent"}, the
last one with the report's `url`) and topic `log`; the run's lifecycle on
topic `run` comes from the runner. Three durable steps (fetch, process,
generate) take `JOBS_REPORT_STEP_S` each; the data is synthetic and seeded, the
PDF real (fpdf2), kept in the database and served at `GET /reports/<run_id>`.
"""
from __future__ import annotations

import random
import time
from datetime import date, timedelta
from typing import Any

from flask import Blueprint, Response, current_app
from fpdf import FPDF
from fpdf.enums import XPos, YPos

from .errors import NonRetriableError, ReportNotFound
from .registry import function
from .steps import Context

REPORT_FILE = "report.pdf"
REGIONS = ("North", "South", "East", "West")

blueprint = Blueprint("reports", __name__)


@function(id="generate-report", trigger="report.requested", retries=3)
def generate_report(ctx: Context) -> dict[str, Any]:
    title, days, seed = _parameters(ctx.event.data, default_seed=ctx.event.id)
    pause_s = float(current_app.config["JOBS_REPORT_STEP_S"])

    ctx.publish(ctx.channel, "status", {"stage": "fetching", "percent": 10})
    ctx.publish(ctx.channel, "log", {"level": "info", "message": f"Fetching {days} days of orders"})
    orders = ctx.step.run("fetch", fetch_orders, seed, days, pause_s)

    ctx.publish(ctx.channel, "status", {"stage": "processing", "percent": 40})
    ctx.publish(ctx.channel, "log", {"level": "info", "message": f"Summarizing {len(orders)} order rows"})
    summary = ctx.step.run("process", summarize, orders, pause_s)

    ctx.publish(ctx.channel, "status", {"stage": "generating", "percent": 70})
    ctx.publish(ctx.channel, "log", {"level": "info", "message": "Rendering the PDF"})
    pdf = ctx.step.run("generate", render_and_save, ctx, title, summary, pause_s)

    url = f"/reports/{ctx.run_id}"
    ctx.publish(ctx.channel, "log", {"level": "info", "message": f"Report ready: {pdf['pages']} page(s), {pdf['bytes']} bytes"})
    ctx.publish(ctx.channel, "status", {"stage": "done", "percent": 100, "url": url})
    return {"url": url, **pdf}


def _parameters(data: dict[str, Any], default_seed: str) -> tuple[str, int, Any]:
    title = data.get("title", "Sales report")
    days = data.get("days", 30)
    if not isinstance(title, str) or not 0 < len(title) <= 100:
        raise NonRetriableError("'title' must be a string of 1-100 characters")
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 366:
        raise NonRetriableError("'days' must be an integer from 1 to 366")
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


def render_and_save(ctx: Context, title: str, summary: dict[str, Any], pause_s: float) -> dict[str, int]:
    time.sleep(pause_s)
    content, pages = render_pdf(title, ctx.run_id, summary)
    ctx.save_file(REPORT_FILE, content, "application/pdf")
    return {"pages": pages, "bytes": len(content)}


def _latin1(text: str) -> str:
    # The PDF core fonts cover Latin-1 only; anything else prints as "?".
    return text.encode("latin-1", "replace").decode("latin-1")


def render_pdf(title: str, run_id: str, summary: dict[str, Any]) -> tuple[bytes, int]:
    """The report as PDF bytes, and its number of pages."""
    pdf = FPDF()
    pdf.set_title(_latin1(title))
    pdf.add_page()
    pdf.set_font("Helvetica", "B", 20)
    pdf.cell(0, 12, _latin1(title), new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.set_font("Helvetica", size=10)
    days = summary["days"]
    pdf.cell(0, 6, f"Run {run_id}  -  {days[0]['day']} to {days[-1]['day']}", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(4)
    pdf.set_font("Helvetica", "B", 12)
    pdf.cell(0, 8, f"{summary['orders']:,} orders, revenue {summary['revenue']:,.2f}", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(2)

    pdf.set_font("Helvetica", size=11)
    with pdf.table(col_widths=(40, 30, 40), text_align=("LEFT", "RIGHT", "RIGHT"), width=110, align="LEFT") as table:
        table.row(("Region", "Orders", "Revenue"))
        for region in summary["regions"]:
            table.row((region["region"], f"{region['orders']:,}", f"{region['revenue']:,.2f}"))

    pdf.ln(8)
    pdf.set_font("Helvetica", "B", 12)
    pdf.cell(0, 8, "Revenue per day", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    _bar_chart(pdf, [d["revenue"] for d in days], x=pdf.l_margin, y=pdf.get_y() + 2, width=180, height=60)
    return bytes(pdf.output()), pdf.pages_count


def _bar_chart(pdf: FPDF, values: list[float], *, x: float, y: float, width: float, height: float) -> None:
    pdf.set_draw_color(160, 160, 160)
    pdf.line(x, y + height, x + width, y + height)
    pdf.set_fill_color(52, 101, 164)
    top = max(values) or 1.0
    slot = width / len(values)
    for i, value in enumerate(values):
        bar = height * value / top
        pdf.rect(x + i * slot + slot * 0.15, y + height - bar, slot * 0.7, bar, style="F")


# -- the download -----------------------------------------------------------------


@blueprint.get("/reports/<run_id>")
def download(run_id: str) -> Response:
    stored = current_app.extensions["jobs"].file(run_id, REPORT_FILE)
    if stored is None:
        raise ReportNotFound(
            f"there is no report for run {run_id!r} (yet); it exists once the run's "
            "status on channel run.<run_id> says 'done'"
        )
    return Response(
        stored.content,
        mimetype=stored.content_type,
        headers={"Content-Disposition": f'inline; filename="report-{run_id}.pdf"'},
    )
