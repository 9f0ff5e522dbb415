"""report.html: one self-contained page a clinician can read (semantic tables, figures inline, escaped text)."""

from __future__ import annotations

import base64
import html
from typing import Any

from .report_blocks import Block, Bullets, Figure, Para, Section, Table, Verdict
from .report_content import report_content

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em;
 color:#1f2328;line-height:1.45}
h1{font-size:1.5em;margin-bottom:.3em} h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #d0d7de}
.verdict{border-left:8px solid;padding:.8em 1.1em;margin:1em 0;background:#f6f8fa}
.verdict.passed{border-color:#1a7f37} .verdict.failed{border-color:#cf222e}
.verdict .headline{font-size:1.35em;font-weight:650;margin:0 0 .4em}
.verdict.passed .headline{color:#1a7f37} .verdict.failed .headline{color:#cf222e}
.verdict p{margin:.25em 0}
.warning{background:#fff8c5;border:1px solid #d4a72c;padding:.5em .8em;border-radius:4px;font-weight:600}
table{border-collapse:collapse;margin:.6em 0 1em;font-size:14px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d0d7de;padding:.35em .6em;text-align:right;vertical-align:top}
th{background:#f6f8fa;text-align:center} td:first-child,th:first-child{text-align:left}
th[scope=row]{white-space:nowrap}
tr.pass td:last-child{color:#1a7f37;font-weight:600} tr.fail td{background:#ffebe9}
tr.fail td:last-child{color:#cf222e;font-weight:700} tr.ref td{color:#57606a}
caption{caption-side:top;text-align:left;font-style:italic;padding-bottom:.3em}
figure{margin:1em 0} figure img{max-width:100%;height:auto;border:1px solid #d0d7de}
figcaption{font-size:14px;color:#57606a}
"""


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _table(t: Table) -> str:
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in t.header)
    rows = []
    for i, row in enumerate(t.rows):
        cls = f' class="{_e(t.row_classes[i])}"' if i < len(t.row_classes) and t.row_classes[i] else ""
        cells = "".join(f'<th scope="row">{_e(c)}</th>' if j == 0 else f"<td>{_e(c)}</td>" for j, c in enumerate(row))
        rows.append(f"<tr{cls}>{cells}</tr>")
    caption = f"<caption>{_e(t.caption)}</caption>" if t.caption else ""
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _block(b: Block, pngs: dict[str, bytes]) -> str:
    if isinstance(b, Para):
        return f'<p class="{_e(b.kind)}">{_e(b.text)}</p>' if b.kind else f"<p>{_e(b.text)}</p>"
    if isinstance(b, Bullets):
        return "<ul>" + "".join(f"<li>{_e(i)}</li>" for i in b.items) + "</ul>"
    if isinstance(b, Figure):
        if b.name not in pngs:
            return ""
        data = base64.b64encode(pngs[b.name]).decode()
        return (f'<figure id="fig-{_e(b.name)}"><img alt="{_e(b.caption)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{_e(b.caption)}</figcaption></figure>")
    return _table(b)


def _verdict(v: Verdict) -> str:
    state = "passed" if v.passed else "failed"
    lines = "".join(f"<p>{_e(line)}</p>" for line in v.lines)
    warnings = "".join(f'<p class="warning">{_e(w)}</p>' for w in v.warnings)
    return (f'<section class="verdict {state}" aria-label="verdict"><p class="headline">{_e(v.headline)}</p>'
            f"{lines}{warnings}</section>")


def _section(s: Section, pngs: dict[str, bytes]) -> str:
    body = "\n".join(_block(b, pngs) for b in s.blocks)
    return f"<section><h2>{_e(s.title)}</h2>\n{body}</section>"


def render_html(report: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """A self-contained page: the verdict, then every section as HTML tables, figures inline."""
    figure_files = [f"figures/{n}.png" for n in pngs]
    verdict, sections = report_content({**report, "figure_files": figure_files})
    name = _e(str(report.get("name", "bundle")))
    body = "\n".join(_section(s, pngs) for s in sections)
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>fundus-edge report: {name}</title><style>{CSS}</style></head>\n"
            f"<body><h1>fundus-edge report: {name}</h1>\n{_verdict(verdict)}\n{body}\n</body></html>\n")
