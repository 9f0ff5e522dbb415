"""The one place that turns results into text or JSON on stdout, and errors into stderr lines."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import FundusEdgeError


def emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    """``--json``: one JSON document on stdout; otherwise the text."""
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2))
    else:
        print(text)


def error(args: argparse.Namespace, exc: FundusEdgeError) -> None:
    """A user error: a JSON error document on stdout with ``--json``, always one line on stderr."""
    if getattr(args, "json", False):
        print(json.dumps({"error": {"code": exc.code, "message": str(exc), "exit_code": exc.exit_code}}))
    print(f"fundus-edge: error: {exc}", file=sys.stderr)


def warn(text: str) -> None:
    print(f"fundus-edge: warning: {text}", file=sys.stderr)


def log(text: str) -> None:
    """Progress for long work: stderr, flushed (never stdout, which carries results)."""
    print(text, file=sys.stderr, flush=True)


def printable(text: str) -> str:
    """``text`` safe for a terminal: control characters (ANSI escapes included) and bytes that were not UTF-8
    (surrogate escapes of file names) shown escaped; everything else as is. JSON output keeps the original."""
    if text.isprintable():
        return text
    out = []
    for ch in text:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # an undecodable byte of a file name (os.fsdecode's surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch.isprintable() or ch == " ":
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
    return "".join(out)


def screening_line(r: Any) -> str:
    """One screening result as a line (two for an ungradable image: the reasons, then the retake hint)."""
    name = printable(Path(r.source).name)
    if r.error:
        return f"{name:<28} ERROR     {r.error['code']}: {printable(r.error['message'])}"
    if r.decision == "ungradable":
        q = r.quality or {}
        return (f"{name:<28} UNGRADABLE no referral decision: {'; '.join(q.get('reasons', []))}\n"
                f"{'':<29}{q.get('hint') or ''}")
    if r.decision == "segmented":
        b = getattr(r, "biomarkers", None) or {}
        mask = getattr(r, "mask_path", None) or getattr(r, "mask", None)
        return (f"{name:<28} SEGMENTED vessel density {b.get('density', float('nan')):.4f}, fractal dimension "
                f"{b.get('fractal_dimension', float('nan')):.3f}; mask {printable(str(mask))}")
    t = r.timings_ms
    fov = "" if r.fov and r.fov.get("found") else "  (no field of view found: centre crop)"
    return (f"{name:<28} {r.decision.upper():<9} p(referable)={r.probability:.3f} (threshold {r.threshold:.3f})"
            f"  decode {t['decode']:.1f} ms, preprocess {t['preprocess']:.1f} ms, infer {t['infer']:.1f} ms{fov}")


def screening_summary(summary: dict[str, Any]) -> str:
    return (f"{summary['n']} images: {summary['refer']} refer, {summary['no_refer']} no-refer, "
            f"{summary['ungradable']} ungradable (retake), {summary['errors']} could not be screened")


def fmt_opt(v: float | None) -> str:
    """A metric that may be missing (no positives, no negatives): '-'."""
    return "-" if v is None else f"{v:.4f}"


class Progress:
    """"screened 12/364" on stderr, rewritten in place, only when stderr is a terminal (never in logs or pipes)."""

    def __init__(self, total: int, what: str = "screened") -> None:
        self.total, self.what, self.n = total, what, 0
        self.live = sys.stderr.isatty() and total > 1

    def step(self) -> None:
        self.n += 1
        if self.live:
            print(f"\r{self.what} {self.n}/{self.total}", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.live:
            print("\r" + " " * (len(self.what) + 2 * len(str(self.total)) + 2) + "\r", end="", file=sys.stderr,
                  flush=True)


def refuse_word_as_path(first: str | None, words: tuple[str, ...], command: str) -> None:
    """A bare word where a sub-command or paths go (``quality calibrat``, ``emulate set-up``) that is not a file or
    folder here is a mistyped sub-command, never an image name: say so instead of "file not found" per image."""
    import re

    from ..errors import UsageError

    if first and re.fullmatch(r"[a-z][a-z-]*", first) and first not in words and not Path(first).exists():
        raise UsageError(f"'{first}' is neither a file nor a sub-command of {command} (sub-commands: "
                         f"{', '.join(words)})")
