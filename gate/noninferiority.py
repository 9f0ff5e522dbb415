"""Paired bootstrap non-inferiority of a candidate (int8) against the reference (fp32) on the same images.

Each resample draws images with replacement and recomputes, on the SAME images for both models, the AUC
difference and the sensitivity difference at the locked threshold. Percentile 95 % CIs; reproducible by seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .metrics import auc


@dataclass(frozen=True)
class NonInferiority:
    delta_auc: float
    delta_auc_ci: tuple[float, float]
    delta_sensitivity: float
    delta_sensitivity_ci: tuple[float, float]
    n_boot: int
    seed: int
    level: float = 0.95  # two-sided level of the CIs (the gate asks for 2 * confidence - 1: one-sided bounds)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["delta_auc_ci"] = list(self.delta_auc_ci)
        d["delta_sensitivity_ci"] = list(self.delta_sensitivity_ci)
        return d


def _sens(y: np.ndarray, s: np.ndarray, t: float) -> float:
    pos = y.astype(bool)
    return float(np.mean(s[pos] >= t))


def paired_bootstrap(labels: np.ndarray, reference: np.ndarray, candidate: np.ndarray, threshold: float,
                     n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> NonInferiority:
    y = np.asarray(labels).astype(int)
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(candidate, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n = len(y)
    d_auc: list[float] = []
    d_sens: list[float] = []
    while len(d_auc) < n_boot:
        idx = rng.integers(0, n, n)
        yb = y[idx]
        if yb.all() or not yb.any():
            continue
        d_auc.append(auc(yb, c[idx]) - auc(yb, r[idx]))
        d_sens.append(_sens(yb, c[idx], threshold) - _sens(yb, r[idx], threshold))
    a = (1 - level) / 2
    return NonInferiority(
        delta_auc=auc(y, c) - auc(y, r),
        delta_auc_ci=(float(np.quantile(d_auc, a)), float(np.quantile(d_auc, 1 - a))),
        delta_sensitivity=_sens(y, c, threshold) - _sens(y, r, threshold),
        delta_sensitivity_ci=(float(np.quantile(d_sens, a)), float(np.quantile(d_sens, 1 - a))),
        n_boot=n_boot,
        seed=seed,
        level=level,
    )
