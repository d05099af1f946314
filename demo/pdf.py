"""The report as a PDF (fpdf2): a title, a table per region and a bar chart per day."""
from __future__ import annotations

from typing import Any

from fpdf import FPDF
from fpdf.enums import XPos, YPos


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
