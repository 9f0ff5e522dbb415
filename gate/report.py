"""Build / check reports: ``report.json`` (numbers), ``report.md`` (text) and ``report.html`` (tables, figures).

The content is assembled once (:mod:`.report_content`) and rendered as markdown (:mod:`.report_md`) and HTML
(:mod:`.report_html`), so the two say the same things."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .report_html import render_html
from .report_md import render_markdown

__all__ = ["render_html", "render_markdown", "write_reports"]


def write_reports(folder: Path, report: dict[str, Any], figures: bool = True) -> list[Path]:
    """report.json, report.md and (with matplotlib) figures/*.png + a self-contained report.html."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    pngs: dict[str, bytes] = {}
    if figures and "scores" in report:
        from .plots import figure_data, render_pngs

        report = {**report, "figures": figure_data(report)}
        pngs = render_pngs(report["figures"], report["operating_point"])
        (folder / "figures").mkdir(exist_ok=True)
        report["figure_files"] = []
        for name, data in pngs.items():
            p = folder / "figures" / f"{name}.png"
            p.write_bytes(data)
            written.append(p)
            report["figure_files"].append(f"figures/{name}.png")
        h = folder / "report.html"
        h.write_text(render_html(report, pngs))
        written.append(h)
    j = folder / "report.json"
    j.write_text(json.dumps(report, indent=2) + "\n")
    m = folder / "report.md"
    m.write_text(render_markdown(report))
    return [j, m, *written]
