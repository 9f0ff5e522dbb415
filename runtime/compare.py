"""One comparator for export validation, int8 checks, `compare` and emulated devices (after Polygraphy).

A :class:`CompareResult` is a value: truthy when it passes its tolerances, printable as a table row and
serialisable to JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .postprocess import referable_probability


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-3  # max abs difference of outputs (logits)
    min_top1_agreement: float = 1.0
    min_decision_agreement: float = 1.0


@dataclass(frozen=True)
class CompareResult:
    reference: str
    candidate: str
    n: int
    max_abs: float
    mean_abs: float
    median_abs: float
    top1_agreement: float
    decision_agreement: float
    tolerance: Tolerance
    failures: tuple[str, ...]

    def __bool__(self) -> bool:
        return not self.failures

    @property
    def passed(self) -> bool:
        return bool(self)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        d["failures"] = list(self.failures)
        return d

    def row(self) -> str:
        status = "PASS" if self else "FAIL"
        return (f"{self.reference:>12} vs {self.candidate:<12} n={self.n:<4} max|d|={self.max_abs:.2e} "
                f"mean|d|={self.mean_abs:.2e} top1={self.top1_agreement:.3f} "
                f"decision={self.decision_agreement:.3f} {status}")


def compare_outputs(reference: np.ndarray, candidate: np.ndarray, *, reference_name: str = "reference",
                    candidate_name: str = "candidate", tolerance: Tolerance | None = None,
                    positive_classes: list[int] | None = None, threshold: float = 0.5) -> CompareResult:
    """Compare two (N, C) output arrays: abs differences, top-1 and referral-decision agreement."""
    tol = tolerance or Tolerance()
    a = np.asarray(reference, dtype=np.float64)
    b = np.asarray(candidate, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"output shapes differ: {reference_name} {a.shape} vs {candidate_name} {b.shape}")
    diff = np.abs(a - b)
    n = a.shape[0]
    if a.shape[-1] > 1:
        top1 = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    else:
        top1 = float(np.mean((a[:, 0] > 0) == (b[:, 0] > 0)))
    pos = positive_classes if positive_classes is not None else [a.shape[-1] - 1]
    da = referable_probability(a, pos) >= threshold
    db = referable_probability(b, pos) >= threshold
    decision = float(np.mean(da == db))
    failures = []
    if not np.all(np.isfinite(b)):
        failures.append(f"{candidate_name} produced non-finite outputs")
    if diff.max() > tol.atol:
        failures.append(f"max abs diff {diff.max():.3g} > atol {tol.atol:g}")
    if top1 < tol.min_top1_agreement:
        failures.append(f"top-1 agreement {top1:.3f} < {tol.min_top1_agreement}")
    if decision < tol.min_decision_agreement:
        failures.append(f"decision agreement {decision:.3f} < {tol.min_decision_agreement}")
    return CompareResult(reference_name, candidate_name, n, float(diff.max()), float(diff.mean()),
                         float(np.median(diff)), top1, decision, tol, tuple(failures))
