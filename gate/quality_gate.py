"""The clinical gate's view of image quality: ungradable rate, metrics on gradable images, and the
"ungradable counts as refer" policy.

Clinical studies of autonomous screening report the share of ungradable ("non-imageable") images separately
and sensitivity/specificity on the gradable ones; a programme that refers every ungradable patient instead
sees the policy numbers. Plain numpy, like the rest of the gate; the int8-vs-fp32 comparison stays in gate.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .gate import GateCriteria, evaluate
from .metrics import confusion, sensitivity_specificity
from .report_blocks import Block, Para, Section, Table, fmt

HIGH_UNGRADABLE_RATE = 0.2


def _nan_to_none(v: float) -> float | None:
    return None if v != v else float(v)


def quality_summary(labels: np.ndarray, gradable: np.ndarray, scores: Mapping[str, np.ndarray], threshold: float,
                    criteria: GateCriteria, quality: Sequence[Mapping[str, Any]], sources: Sequence[str],
                    spec_source: str, reference: str) -> dict[str, Any]:
    """Everything report.json, report.md and the manifest say about image quality on the validation set.

    The operating point stays the one the gate locked on all validation images (the int8-vs-fp32 gate is
    unchanged); the gradable-only numbers are evaluated at that threshold, and a note says when the
    reference's gradable-only sensitivity falls below the operating-point target.
    """
    y = np.asarray(labels).astype(int)
    g = np.asarray(gradable, dtype=bool)
    n, n_ung = len(y), int((~g).sum())
    failed = Counter(f for q in quality if not q.get("gradable", True) for f in q.get("failed", []))
    out: dict[str, Any] = {
        "spec_source": spec_source,
        "threshold": threshold,
        "n": n,
        "n_ungradable": n_ung,
        "ungradable_rate": n_ung / n if n else 0.0,
        "ungradable_referable": int(((~g) & (y == 1)).sum()),
        "ungradable_non_referable": int(((~g) & (y == 0)).sum()),
        "failed_measures": dict(failed.most_common()),
        "ungradable_images": [{"source": s, "failed": q.get("failed", [])}
                              for s, q, ok in zip(sources, quality, g, strict=True) if not ok][:50],
        "gradable": {},
        "ungradable_as_refer": {},
    }
    yg = y[g]
    for name, s in scores.items():
        s = np.asarray(s, dtype=np.float64)
        if yg.size and yg.any() and not yg.all():
            out["gradable"][name] = evaluate(name, yg, s[g], threshold, criteria).to_dict()
        else:
            sens, spec = sensitivity_specificity(yg, s[g], threshold) if yg.size else (float("nan"),) * 2
            out["gradable"][name] = {"name": name, "n": int(yg.size), "sensitivity": _nan_to_none(sens),
                                     "specificity": _nan_to_none(spec),
                                     "note": "the gradable images hold one class only: no AUC"}
        policy = np.where(g, s, np.inf)  # an ungradable image is referred
        sens, spec = sensitivity_specificity(y, policy, threshold)
        out["ungradable_as_refer"][name] = {"sensitivity": _nan_to_none(sens), "specificity": _nan_to_none(spec),
                                            "confusion": confusion(y, policy, threshold)}
    notes = []
    if n and n_ung / n > HIGH_UNGRADABLE_RATE:
        notes.append(f"{n_ung / n:.0%} of the validation images are ungradable: check that the quality spec fits "
                     "this camera ('fundus-edge quality calibrate') and that the validation photos are usable")
    target = _sensitivity_target(criteria.operating_point)
    ref_sens = out["gradable"].get(reference, {}).get("sensitivity")
    if target is not None and ref_sens is not None and n_ung and ref_sens < target:
        notes.append(f"on the gradable images the {reference} sensitivity is {ref_sens:.3f}, below the operating "
                     f"point's target {target:.2f}")
    if notes:
        out["note"] = "; ".join(notes)
    return out


def _sensitivity_target(rule: str) -> float | None:
    rule = rule.replace(" ", "")
    if rule.startswith("sensitivity>="):
        try:
            return float(rule.split(">=", 1)[1])
        except ValueError:
            return None
    return None


def manifest_summary(q: Mapping[str, Any]) -> dict[str, Any]:
    """The short form kept in the manifest's gate summary."""
    return {
        "n_ungradable": q["n_ungradable"], "ungradable_rate": q["ungradable_rate"],
        "gradable": {k: {"n": v.get("n"), "auc": v.get("auc"), "sensitivity": v.get("sensitivity"),
                         "specificity": v.get("specificity")} for k, v in q["gradable"].items()},
        "ungradable_as_refer": {k: {"sensitivity": v["sensitivity"], "specificity": v["specificity"]}
                                for k, v in q["ungradable_as_refer"].items()},
    }


def quality_section(q: Mapping[str, Any] | None) -> Section | None:
    """The report's image-quality section (None when the report has no quality block)."""
    if not q:
        return None
    blocks: list[Block] = [Para(
        f"Ungradable: {q['n_ungradable']} of {q['n']} validation images ({q['ungradable_rate']:.1%}; "
        f"{q['ungradable_referable']} referable, {q['ungradable_non_referable']} not); quality spec: "
        f"{q['spec_source']}. Gradable-only numbers are at the gate's threshold {q['threshold']:.4f}.")]
    if q["failed_measures"]:
        blocks.append(Para("Failed measures: " + ", ".join(f"{k} {v}" for k, v in q["failed_measures"].items())
                           + "."))
    if q.get("note"):
        blocks.append(Para(f"Note: {q['note']}.", "warning"))
    rows = []
    for name, e in q["gradable"].items():
        pol = q["ungradable_as_refer"][name]
        rows.append((name, fmt(e.get("n")), fmt(e.get("auc")), fmt(e.get("sensitivity")), fmt(e.get("specificity")),
                     fmt(pol["sensitivity"]), fmt(pol["specificity"])))
    blocks.append(Table(("artifact", "gradable n", "AUC", "sensitivity", "specificity",
                         "sensitivity if ungradable = refer", "specificity if ungradable = refer"), rows))
    return Section("Image quality (gradable images)", blocks)
