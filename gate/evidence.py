"""Confidence bounds behind the gate's three verdicts (PASS / FAIL / INSUFFICIENT EVIDENCE), numpy + stdlib only.

* Wilson score interval of a proportion (sensitivity, specificity; the operating-point drift in ``check``).
* Exact Clopper-Pearson upper bound of the discordance (flip) rate: solved on the binomial CDF by bisection.
* Newcombe's hybrid-score interval for a difference of PAIRED proportions (Newcombe 1998, method 10): the
  candidate and the reference call the same images, so Δsensitivity (on the referable images) and Δspecificity
  (on the others) are paired; the interval combines the two Wilson intervals with the phi correlation of the
  2x2 concordance table. Closed form: no resampling, microseconds.
* How many images a margin would need, if the observed proportions held (:func:`needed_n`).
* The fp32 uncertainty band: the spread of the locked threshold over bootstrap resamples of the reference scores.
* The seeded stratified split into a search part and a disjoint certification part.

All bounds are one-sided at ``confidence`` (0.95: the lower end of a two-sided 90 % interval).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from statistics import NormalDist

import numpy as np


def z_one_sided(confidence: float) -> float:
    return NormalDist().inv_cdf(confidence)


def wilson(k: int, n: int, z: float) -> tuple[float, float]:
    """Wilson score interval of k successes in n (``z`` per side); (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def _binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space."""
    if p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 1.0 if k >= n else 0.0
    i = np.arange(k + 1, dtype=np.float64)
    lg = np.array([math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) for j in range(k + 1)])
    logs = lg + i * math.log(p) + (n - i) * math.log1p(-p)
    m = float(logs.max())
    return float(min(1.0, math.exp(m) * np.exp(logs - m).sum()))


def clopper_pearson_upper(k: int, n: int, confidence: float = 0.95) -> float:
    """Exact one-sided upper confidence bound of a binomial rate: the p with P(X <= k | n, p) = 1 - confidence."""
    if n <= 0 or k >= n:
        return 1.0
    lo, hi = k / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _binom_cdf(k, n, mid) > 1 - confidence:
            lo = mid
        else:
            hi = mid
    return hi


def paired_difference_lower(a: int, b: int, c: int, d: int, confidence: float = 0.95) -> float:
    """One-sided lower bound of p1 - p2 for paired proportions (Newcombe 1998, method 10).

    The 2x2 table over the same n items: ``a`` both succeed, ``b`` only the first (candidate), ``c`` only the
    second (reference), ``d`` neither. p1 = (a + b) / n, p2 = (a + c) / n. -1.0 when n is 0."""
    n = a + b + c + d
    if n == 0:
        return -1.0
    z = z_one_sided(confidence)
    p1, p2 = (a + b) / n, (a + c) / n
    l1, _ = wilson(a + b, n, z)
    _, u2 = wilson(a + c, n, z)
    den = (a + b) * (c + d) * (a + c) * (b + d)
    phi = (a * d - b * c) / math.sqrt(den) if den > 0 else 0.0
    e1, e2 = p1 - l1, u2 - p2
    return (p1 - p2) - math.sqrt(max(0.0, e1 * e1 - 2 * phi * e1 * e2 + e2 * e2))


def needed_n(bound_at: Callable[[int], float], n_now: int, inside: Callable[[float], bool],
             n_max: int = 10_000_000) -> int | None:
    """The smallest n (>= ``n_now``) whose bound, ``bound_at(n)`` (the observed proportions scaled to n), is
    inside the margin; ``None`` when not even ``n_max`` would do (the observed estimate is itself beyond it)."""
    n = max(n_now, 1)
    if inside(bound_at(n)):
        return n
    hi = n
    while not inside(bound_at(hi)):
        if hi >= n_max:
            return None
        hi = min(hi * 2, n_max)
    lo = hi // 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if inside(bound_at(mid)):
            hi = mid
        else:
            lo = mid
    return hi


def scaled(counts: tuple[int, ...], n: int) -> tuple[int, ...]:
    """``counts`` rescaled to sum to ``n`` (the observed proportions held at a larger sample)."""
    total = sum(counts)
    if total == 0:
        return tuple(0 for _ in counts)
    out = [round(c * n / total) for c in counts]
    out[int(np.argmax(counts))] += n - sum(out)
    return tuple(out)


def threshold_band(labels: np.ndarray, reference_scores: np.ndarray, rule: str, threshold: float,
                   n_boot: int = 200, seed: int = 0) -> tuple[float, float]:
    """Where fp32 itself is uncertain: the central 95 % of the thresholds that ``rule`` locks on bootstrap
    resamples of the reference's own scores (widened to include ``threshold``). An image whose fp32 score lies
    in this band is called either way depending on which validation sample locked the operating point, so a
    flip there says little about int8; a flip outside it is a decision int8 changed on a clear-cut image."""
    from .metrics import lock_threshold

    y = np.asarray(labels).astype(int)
    s = np.asarray(reference_scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    ts: list[float] = []
    tries = 0
    while len(ts) < n_boot and tries < 4 * n_boot:
        tries += 1
        idx = rng.integers(0, len(y), len(y))
        if y[idx].all() or not y[idx].any():
            continue
        ts.append(lock_threshold(y[idx], s[idx], rule))
    if not ts:
        return threshold, threshold
    lo, hi = float(np.quantile(ts, 0.025)), float(np.quantile(ts, 0.975))
    return min(lo, threshold), max(hi, threshold)


def stratified_split(labels: np.ndarray, seed: int = 0, fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """(search indices, certification indices): a seeded split of each class, ``fraction`` of it to search."""
    y = np.asarray(labels).astype(int)
    rng = np.random.default_rng(seed)
    search: list[np.ndarray] = []
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        search.append(idx[: round(len(idx) * fraction)])
    s = np.sort(np.concatenate(search)) if search else np.array([], dtype=int)
    cert = np.setdiff1d(np.arange(len(y)), s)
    return s.astype(int), cert.astype(int)


__all__ = ["clopper_pearson_upper", "needed_n", "paired_difference_lower", "scaled", "stratified_split",
           "threshold_band", "wilson", "z_one_sided"]
