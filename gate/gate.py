"""The clinical accuracy gate: does an artifact screen as well as the fp32 reference it came from?

Evaluated on the exported files through the runtime's backends (what ships is what is measured). The
operating point is locked on the fp32 reference; each candidate is compared at that threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .metrics import auc, bootstrap_auc_ci, confusion, lock_threshold, sensitivity_specificity
from .noninferiority import NonInferiority, paired_bootstrap
from .verdict import FAIL, INSUFFICIENT, PASS, Evidence, assess, describe


@dataclass(frozen=True)
class GateCriteria:
    min_delta_auc: float = -0.005
    min_delta_sensitivity: float = -0.01
    max_flip_rate: float = 0.01
    operating_point: str = "sensitivity>=0.90"
    n_boot: int = 1000
    seed: int = 0
    # When set, the lower 95 % bound of the paired-bootstrap Δsensitivity must lie above this margin
    # (non-inferiority, e.g. -0.02). Off by default; the CIs are always reported.
    noninferiority_margin: float | None = None
    # An int8 artifact with a smaller share of its MACs in int8 fails: a mostly-fp32 file is not an int8 model
    # (what a fallback that keeps too much in float produces). Ship the fp32 file instead, or set 0.
    min_int8_mac_fraction: float = 0.5
    # Δspecificity below this fails; its one-sided lower bound above it is needed for a PASS
    min_delta_specificity: float = -0.02
    # one-sided confidence of every bound behind the verdict (see gate/verdict.py, docs/gate.md)
    confidence: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one model's scores on the validation set at a given threshold."""

    name: str
    n: int
    prevalence: float
    auc: float
    auc_ci: tuple[float, float]
    sensitivity: float
    specificity: float
    confusion: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["auc_ci"] = list(self.auc_ci)
        return d


def evaluate(name: str, labels: np.ndarray, scores: np.ndarray, threshold: float,
             criteria: GateCriteria) -> Evaluation:
    y = np.asarray(labels).astype(int)
    ci = bootstrap_auc_ci(y, scores, criteria.n_boot, criteria.seed)
    sens, spec = sensitivity_specificity(y, scores, threshold)
    return Evaluation(name, len(y), float(y.mean()), auc(y, scores), (ci.low, ci.high), sens, spec,
                      confusion(y, scores, threshold))


@dataclass(frozen=True)
class GateResult:
    """One candidate against the reference. Truthy when its verdict is PASS.

    ``failures``: why it FAILs (harm observed); ``insufficient``: what the bounds could not show (INSUFFICIENT
    EVIDENCE when there is no failure); ``certification``: which images it was gated on."""

    artifact: str
    reference: str
    threshold: float
    candidate_eval: Evaluation
    reference_eval: Evaluation
    delta_auc: float
    delta_sensitivity: float
    delta_specificity: float
    flips: int
    flip_rate: float
    criteria: GateCriteria
    failures: tuple[str, ...]
    noninferiority: NonInferiority | None = None
    insufficient: tuple[str, ...] = ()
    evidence: Evidence | None = None
    certification: dict[str, Any] | None = None

    def __bool__(self) -> bool:
        return self.verdict == PASS

    @property
    def verdict(self) -> str:
        return FAIL if self.failures else (INSUFFICIENT if self.insufficient else PASS)

    @property
    def acceptable(self) -> bool:
        """No harm observed (point estimates inside the margins): what the fallback search selects on."""
        return not self.failures

    @property
    def passed(self) -> bool:
        return bool(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "artifact": self.artifact, "reference": self.reference, "passed": self.passed, "verdict": self.verdict,
            "threshold": self.threshold, "auc": self.candidate_eval.auc,
            "auc_ci": list(self.candidate_eval.auc_ci), "sensitivity": self.candidate_eval.sensitivity,
            "specificity": self.candidate_eval.specificity, "confusion": self.candidate_eval.confusion,
            "delta_auc": self.delta_auc, "delta_sensitivity": self.delta_sensitivity,
            "delta_specificity": self.delta_specificity, "flips": self.flips, "flip_rate": self.flip_rate,
            "criteria": self.criteria.to_dict(), "failures": list(self.failures),
            "noninferiority": self.noninferiority.to_dict() if self.noninferiority else None,
            "insufficient": list(self.insufficient),
            "evidence": self.evidence.to_dict() if self.evidence else None,
            "certification": self.certification,
        }


def gate(artifact: str, labels: np.ndarray, reference_scores: np.ndarray, candidate_scores: np.ndarray,
         threshold: float, criteria: GateCriteria, reference: str = "onnx-fp32",
         reference_eval: Evaluation | None = None, int8_mac_fraction: float | None = None,
         certification: dict[str, Any] | None = None) -> GateResult:
    """``int8_mac_fraction``: for int8 candidates, the share of MACs the file computes in int8.
    ``certification``: which images these are (recorded in the result)."""
    ref = reference_eval or evaluate(reference, labels, reference_scores, threshold, criteria)
    cand = evaluate(artifact, labels, candidate_scores, threshold, criteria)
    d_auc = cand.auc - ref.auc
    d_sens = cand.sensitivity - ref.sensitivity
    d_spec = cand.specificity - ref.specificity
    flips = int(np.sum((np.asarray(reference_scores) >= threshold) != (np.asarray(candidate_scores) >= threshold)))
    rate = flips / len(labels)
    ni = paired_bootstrap(labels, reference_scores, candidate_scores, threshold, criteria.n_boot, criteria.seed,
                          level=2 * criteria.confidence - 1)
    ev = assess(labels, reference_scores, candidate_scores, threshold, criteria, ni)
    failures = [describe(f) for f in ev.findings if f.verdict == FAIL]
    insufficient = [describe(f) for f in ev.findings if f.verdict == INSUFFICIENT]
    if int8_mac_fraction is not None and int8_mac_fraction < criteria.min_int8_mac_fraction:
        failures.append(f"only {int8_mac_fraction:.1%} of MACs run in int8 "
                        f"(limit {criteria.min_int8_mac_fraction:.0%}):"
                        " mostly fp32")
    return GateResult(artifact, reference, threshold, cand, ref, d_auc, d_sens, d_spec, flips, rate, criteria,
                      tuple(failures), ni, tuple(insufficient), ev, certification)


__all__ = ["FAIL", "INSUFFICIENT", "PASS", "Evaluation", "GateCriteria", "GateResult", "evaluate", "gate",
           "lock_threshold"]
