"""The report's evidence section: each gate's verdict criterion by criterion (estimate, one-sided bound, margin,
images that would show it), the flips inside/outside the fp32 uncertainty band, and which images searched and
which certified (see docs/gate.md)."""

from __future__ import annotations

from typing import Any

from .report_blocks import Bullets, Para, Section, Table

_NAMES = {"delta_auc": "ΔAUC", "delta_sensitivity": "Δsensitivity", "delta_specificity": "Δspecificity",
          "flip_rate": "decision flip rate"}


def _row(artifact: str, f: dict[str, Any]) -> tuple[str, ...]:
    side = "≤" if f["name"] == "flip_rate" else ">"
    return (artifact, _NAMES.get(f["name"], f["name"]), f"{f['estimate']:+.4f}", f"{f['bound']:+.4f}",
            f"{side} {f['margin']:+.4f}", str(f["n"]), f["verdict"],
            "-" if f["n_needed"] is None else str(f["n_needed"]), f["method"])


def certification_line(report: dict[str, Any]) -> str:
    """Which images searched and which certified (names in report.json ``images``)."""
    im = report.get("images") or {}
    if not im:
        return ""
    n_s, n_c = len(im.get("search", [])), len(im.get("certification", []))
    if not n_s:
        return f"No fallback search selected a file: every gate is certified on all {n_c} validation images."
    split = im.get("split", {})
    return (f"A fallback search selected on {n_s} validation images; the files it picked are certified on the "
            f"disjoint {n_c} (stratified split, seed {split.get('seed')}); plain-int8 files on all images. "
            "Both lists are in report.json under 'images'.")


def evidence_section(report: dict[str, Any]) -> Section | None:
    gates = [g for g in report.get("gates", []) if g.get("evidence")]
    if not gates:
        return None
    rows = [_row(g["artifact"], f) for g in gates for f in g["evidence"]["findings"]]
    conf = gates[0]["evidence"]["confidence"]
    bullets = []
    for g in gates:
        e, c = g["evidence"], g.get("certification") or {}
        bullets.append(f"{g['artifact']}: {g['verdict']} on {c.get('images', 'all')} images (n {c.get('n', '?')}); "
                       f"flips inside the fp32 uncertainty band {e['uncertainty_band'][0]:.4f}–"
                       f"{e['uncertainty_band'][1]:.4f}: {e['flips_in_band']}, outside it: {e['flips_outside_band']}")
    blocks: list[Any] = [
        Table(("artifact", "criterion", "estimate", f"one-sided {conf:.0%} bound", "margin", "n", "verdict",
               "images needed", "method"), rows),
        Bullets(bullets),
        Para("PASS: every bound inside its margin. FAIL: an estimate beyond its margin (harm observed). "
             "INSUFFICIENT EVIDENCE: no harm observed, but a bound is outside its margin; 'images needed' assumes "
             "the observed proportions hold. The uncertainty band is the central 95 % of the thresholds the "
             "operating-point rule locks on bootstrap resamples of the fp32 scores."),
    ]
    line = certification_line(report)
    if line:
        blocks.append(Para(line))
    return Section("Evidence: confidence bounds behind each verdict", blocks)


__all__ = ["certification_line", "evidence_section"]
