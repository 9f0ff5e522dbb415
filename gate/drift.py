"""Operating-point drift (``check``): does the locked threshold still give the sensitivity and specificity the
build recorded, on these images? A finding of its own, separate from int8-vs-fp32: the fp32 model itself can
drift on a new camera or population while int8 still agrees with it perfectly.

Each artifact's sensitivity and specificity at the locked threshold, with two-sided 95 % Wilson intervals,
against the targets: sensitivity from the rule (``sensitivity>=0.90`` -> 0.90; else the build's measured value),
specificity the build's measured value. DRIFT when an interval's upper bound is below its target (the shortfall
is beyond chance on this many images); BELOW (not significant) when only the point estimate is below.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .evidence import wilson
from .metrics import confusion

Z95 = 1.959964


@dataclass(frozen=True)
class DriftFinding:
    artifact: str
    metric: str  # sensitivity | specificity
    estimate: float | None
    ci: tuple[float, float]
    n: int
    target: float
    status: str  # OK | BELOW | DRIFT | NO DATA

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ci"] = list(self.ci)
        return d


def targets(rule: str, sensitivity: float | None, specificity: float | None) -> dict[str, float]:
    """The operating point's targets as recorded at build (the rule's sensitivity when it names one)."""
    out: dict[str, float] = {}
    m = re.match(r"^sensitivity>=([0-9.]+)$", rule.replace(" ", ""))
    if m:
        out["sensitivity"] = float(m.group(1))
    elif sensitivity is not None:
        out["sensitivity"] = sensitivity
    if specificity is not None:
        out["specificity"] = specificity
    return out


def _finding(artifact: str, metric: str, k: int, n: int, target: float) -> DriftFinding:
    if n == 0:
        return DriftFinding(artifact, metric, None, (0.0, 1.0), 0, target, "NO DATA")
    lo, hi = wilson(k, n, Z95)
    est = k / n
    status = "DRIFT" if hi < target else ("BELOW" if est < target else "OK")
    return DriftFinding(artifact, metric, est, (lo, hi), n, target, status)


def operating_point_drift(artifact: str, labels: np.ndarray, scores: np.ndarray, threshold: float,
                          goal: dict[str, float]) -> list[DriftFinding]:
    c = confusion(labels, scores, threshold)
    out = []
    if "sensitivity" in goal:
        out.append(_finding(artifact, "sensitivity", c["tp"], c["tp"] + c["fn"], goal["sensitivity"]))
    if "specificity" in goal:
        out.append(_finding(artifact, "specificity", c["tn"], c["tn"] + c["fp"], goal["specificity"]))
    return out


__all__ = ["DriftFinding", "operating_point_drift", "targets"]
