"""The gate's three verdicts, criterion by criterion, from the bounds of :mod:`.evidence`.

For each criterion: FAIL when the point estimate is beyond the margin (harm observed: the old gate's rule, so
anything it failed still fails); PASS when the one-sided confidence bound is inside the margin (non-inferiority
shown); INSUFFICIENT EVIDENCE otherwise, with the number of images that would show it if the observed
proportions held. The artifact's verdict is FAIL if any criterion fails, else INSUFFICIENT EVIDENCE if any is
not shown, else PASS.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .evidence import clopper_pearson_upper, needed_n, paired_difference_lower, scaled, threshold_band

if TYPE_CHECKING:
    from .gate import GateCriteria
    from .noninferiority import NonInferiority

PASS, FAIL, INSUFFICIENT = "PASS", "FAIL", "INSUFFICIENT EVIDENCE"


@dataclass(frozen=True)
class Finding:
    """One criterion: the estimate, its one-sided bound (lower for Δs, upper for the flip rate), the margin."""

    name: str
    estimate: float
    bound: float
    margin: float
    verdict: str
    method: str
    n: int  # images the criterion was measured on (referable only for Δsensitivity, ...)
    n_needed: int | None  # images (all classes) that would show it at the observed proportions; None: cannot

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Evidence:
    """Every criterion's finding, the flips inside/outside the fp32 uncertainty band, and the confidence."""

    confidence: float
    findings: tuple[Finding, ...]
    band: tuple[float, float]  # fp32 score range where fp32's own decision is uncertain
    flips_in_band: int
    flips_outside_band: int

    def to_dict(self) -> dict[str, Any]:
        return {"confidence": self.confidence, "findings": [f.to_dict() for f in self.findings],
                "uncertainty_band": list(self.band), "flips_in_band": self.flips_in_band,
                "flips_outside_band": self.flips_outside_band}


def _lower_finding(name: str, pred_c: np.ndarray, pred_r: np.ndarray, margin: float, fail_margin: float,
                   conf: float, share: float) -> Finding:
    """Δ of a paired proportion (candidate - reference), ``pred_*`` True where each model is right."""
    a, b = int(np.sum(pred_c & pred_r)), int(np.sum(pred_c & ~pred_r))
    c, d = int(np.sum(~pred_c & pred_r)), int(np.sum(~pred_c & ~pred_r))
    n = a + b + c + d
    est = (b - c) / n if n else 0.0
    bound = paired_difference_lower(a, b, c, d, conf)
    verdict = FAIL if n and est < fail_margin else (PASS if bound > margin else INSUFFICIENT)
    need = None
    if verdict == INSUFFICIENT and n and est > margin:
        def at(m: int) -> float:
            sa, sb, sc, sd = scaled((a, b, c, d), m)
            return paired_difference_lower(sa, sb, sc, sd, conf)

        k = needed_n(at, n, lambda v: v > margin)
        need = int(np.ceil(k / share)) if k is not None and share > 0 else None
    return Finding(name, est, bound, margin, verdict, "Newcombe paired hybrid score (method 10)", n, need)


def _flip_finding(flips: int, n: int, margin: float, conf: float) -> Finding:
    rate = flips / n if n else 0.0
    bound = clopper_pearson_upper(flips, n, conf)
    verdict = FAIL if rate > margin else (PASS if bound <= margin else INSUFFICIENT)
    need = None
    if verdict == INSUFFICIENT and rate < margin:
        need = needed_n(lambda m: clopper_pearson_upper(round(rate * m), m, conf), n, lambda v: v <= margin)
    return Finding("flip_rate", rate, bound, margin, verdict, "exact Clopper-Pearson upper bound", n, need)


def _auc_finding(ni: NonInferiority, margin: float, n: int) -> Finding:
    est, low = ni.delta_auc, ni.delta_auc_ci[0]
    verdict = FAIL if est < margin else (PASS if low > margin else INSUFFICIENT)
    need = None
    if verdict == INSUFFICIENT and est > margin and est > low:  # the bound's distance shrinks as 1/sqrt(n)
        need = int(np.ceil(n * ((est - low) / (est - margin)) ** 2))
    return Finding("delta_auc", est, low, margin, verdict, "paired bootstrap percentile (n from 1/sqrt(n) scaling)",
                   n, need)


def assess(labels: np.ndarray, reference: np.ndarray, candidate: np.ndarray, threshold: float,
           criteria: GateCriteria, ni: NonInferiority) -> Evidence:
    """Every criterion's finding for one candidate against the reference on the same images."""
    y = np.asarray(labels).astype(bool)
    r = np.asarray(reference, dtype=np.float64) >= threshold
    c = np.asarray(candidate, dtype=np.float64) >= threshold
    conf, n = criteria.confidence, len(y)
    sens_margin = criteria.noninferiority_margin if criteria.noninferiority_margin is not None \
        else criteria.min_delta_sensitivity
    prevalence = float(y.mean()) if n else 0.0
    findings = (
        _auc_finding(ni, criteria.min_delta_auc, n),
        _lower_finding("delta_sensitivity", c[y], r[y], sens_margin, criteria.min_delta_sensitivity, conf,
                       prevalence),
        _lower_finding("delta_specificity", ~c[~y], ~r[~y], criteria.min_delta_specificity,
                       criteria.min_delta_specificity, conf, 1.0 - prevalence),
        _flip_finding(int(np.sum(r != c)), n, criteria.max_flip_rate, conf),
    )
    lo, hi = threshold_band(y, reference, criteria.operating_point, threshold, seed=criteria.seed) \
        if y.any() and not y.all() else (threshold, threshold)
    flipped = r != c
    in_band = (np.asarray(reference) >= lo) & (np.asarray(reference) <= hi)
    return Evidence(conf, findings, (lo, hi), int(np.sum(flipped & in_band)), int(np.sum(flipped & ~in_band)))


def describe(f: Finding) -> str:
    """One line for people: what was measured and why it gave its verdict."""
    what = {"delta_auc": "ΔAUC", "delta_sensitivity": "Δsensitivity", "delta_specificity": "Δspecificity",
            "flip_rate": "flip rate"}[f.name]
    if f.name == "flip_rate":
        s = (f"{round(f.estimate * f.n)} decisions flipped ({f.estimate:.2%}; upper bound {f.bound:.2%}, limit "
             f"{f.margin:.2%}, n {f.n})")
    elif f.verdict == FAIL:
        s = f"{what[1:]} dropped {f.estimate:+.4f} (limit {f.margin:+.4f}; lower bound {f.bound:+.4f}, n {f.n})"
    else:
        s = f"{what} {f.estimate:+.4f} (lower bound {f.bound:+.4f}, margin {f.margin:+.4f}, n {f.n})"
    if f.verdict == INSUFFICIENT:
        s += (f": not shown; about {f.n_needed} images would show it" if f.n_needed
              else ": not shown at this margin")
    return s


__all__ = ["FAIL", "INSUFFICIENT", "PASS", "Evidence", "Finding", "assess", "describe"]
