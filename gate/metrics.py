"""Screening metrics in plain numpy (the device-side `check` needs no scikit-learn; tests compare with it)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ..errors import DataError, UsageError


def _ranks(scores: np.ndarray) -> np.ndarray:
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.arange(1, len(scores) + 1)
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    return (np.bincount(inv, weights=ranks) / counts)[inv]


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie-averaged ranks)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"AUC needs both classes; got {n_pos} referable and {n_neg} non-referable")
    r = _ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def confusion(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, int]:
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(scores) >= threshold
    return {"tp": int((pred & y).sum()), "fn": int((~pred & y).sum()),
            "fp": int((pred & ~y).sum()), "tn": int((~pred & ~y).sum())}


def sensitivity_specificity(labels: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    c = confusion(labels, scores, threshold)
    sens = c["tp"] / (c["tp"] + c["fn"]) if c["tp"] + c["fn"] else float("nan")
    spec = c["tn"] / (c["tn"] + c["fp"]) if c["tn"] + c["fp"] else float("nan")
    return sens, spec


_SENS_RULE = re.compile(r"^sensitivity>=(0?\.\d+|1(\.0+)?)$")


def lock_threshold(labels: np.ndarray, scores: np.ndarray, rule: str = "sensitivity>=0.90") -> float:
    """The operating point on the reference scores.

    ``sensitivity>=X``: the highest threshold whose sensitivity is at least X (best specificity at that
    sensitivity). ``youden``: the threshold maximising sensitivity + specificity - 1. Either is then moved
    midway to the next lower score, so that no validation image sits exactly on it.
    """
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.all() or not y.any():
        raise DataError("locking a threshold needs both referable and non-referable images")
    candidates = np.unique(s)[::-1]  # high to low
    if rule == "youden":
        best, best_t = -np.inf, float(candidates[-1])
        for t in candidates:
            se, sp = sensitivity_specificity(y, s, float(t))
            if se + sp - 1 > best:
                best, best_t = se + sp - 1, float(t)
        return _between(s, best_t)
    m = _SENS_RULE.match(rule.replace(" ", ""))
    if not m:
        raise UsageError(f"operating-point rule {rule!r} not understood; use 'sensitivity>=0.90' or 'youden'")
    target = float(m.group(1))
    pos_scores = np.sort(s[y])[::-1]
    k = int(np.ceil(target * len(pos_scores)))  # need at least k positives at or above t
    k = min(max(k, 1), len(pos_scores))
    return _between(s, float(pos_scores[k - 1]))


def _between(scores: np.ndarray, anchor: float) -> float:
    """Midway from ``anchor`` down to the next lower score: the same decisions on these scores as ``anchor``,
    but no image sits exactly on the threshold, where a 1e-7 difference between backends would flip it."""
    below = scores[scores < anchor]
    return (anchor + float(below.max())) / 2.0 if below.size else anchor


@dataclass(frozen=True)
class BootstrapCI:
    low: float
    high: float
    n_boot: int
    seed: int


def bootstrap_auc_ci(labels: np.ndarray, scores: np.ndarray, n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> BootstrapCI:
    """Percentile bootstrap CI of the AUC (resamples with one class only are redrawn)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n = len(y)
    vals: list[float] = []
    while len(vals) < n_boot:
        idx = rng.integers(0, n, n)
        yb = y[idx]
        if yb.all() or not yb.any():
            continue
        vals.append(auc(yb, s[idx]))
    a = (1 - level) / 2
    return BootstrapCI(float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a)), n_boot, seed)
