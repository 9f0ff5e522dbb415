"""report.md: the report as text (the same content as report.html, see :mod:`.report_content`)."""

from __future__ import annotations

from typing import Any

from .report_blocks import Block, Bullets, Figure, Para
from .report_content import report_content


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _block(b: Block) -> list[str]:
    if isinstance(b, Para):
        text = f"**{b.text}**" if b.kind in ("strong", "warning") else b.text
        return [text, ""]
    if isinstance(b, Bullets):
        return [f"- {item}" for item in b.items] + [""]
    if isinstance(b, Figure):
        return [f"![{b.name}](figures/{b.name}.png)", "", f"*{b.caption}*", ""]
    lines = [f"*{b.caption}*", ""] if b.caption else []
    lines += ["| " + " | ".join(map(_cell, b.header)) + " |", "|" + "---|" * len(b.header)]
    lines += ["| " + " | ".join(map(_cell, row)) + " |" for row in b.rows]
    return [*lines, ""]


def render_markdown(report: dict[str, Any]) -> str:
    verdict, sections = report_content(report)
    lines = [f"# fundus-edge report: {report.get('name', 'bundle')}", "", f"**{verdict.headline}**", ""]
    lines += [f"{line}  " for line in verdict.lines] + [""]
    lines += [f"**{w}**" for w in verdict.warnings] + ([""] if verdict.warnings else [])
    for s in sections:
        lines += [f"## {s.title}", ""]
        for b in s.blocks:
            lines += _block(b)
    return "\n".join(lines)
