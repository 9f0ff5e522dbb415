"""The report as plain content blocks, rendered twice: report.md (text) and report.html (tables, figures).

Both renderers walk the same blocks, so the two files say the same things."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Para:
    """A paragraph. ``kind``: "" plain, "strong", "warning" (a caveat a reader must not miss)."""

    text: str
    kind: str = ""


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    caption: str = ""
    # per-row CSS class in the HTML (e.g. "pass" / "fail"); ignored by the markdown
    row_classes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Bullets:
    items: list[str]


@dataclass(frozen=True)
class Figure:
    """A figure by name (``figures/NAME.png``) with the sentence that says what it shows."""

    name: str
    caption: str


Block = Para | Table | Bullets | Figure


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Verdict:
    """The headline: passed or not, what was gated, on what data, how sure."""

    passed: bool
    headline: str
    lines: list[str]
    warnings: list[str] = field(default_factory=list)


def fmt(v: object, nd: int = 4) -> str:
    """A number for a table cell ("-" for none)."""
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)
