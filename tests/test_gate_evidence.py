"""The gate's three verdicts and the bounds behind them (gate/evidence.py, gate/verdict.py, gate/drift.py),
checked against independent computations (scipy's beta quantile, brute-force binomial sums, the published
Newcombe example) on synthetic score arrays."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fundus_edge.gate.drift import operating_point_drift, targets
from fundus_edge.gate.evidence import (
    clopper_pearson_upper,
    paired_difference_lower,
    stratified_split,
    threshold_band,
    wilson,
)
from fundus_edge.gate.gate import FAIL, INSUFFICIENT, PASS, GateCriteria, gate
from fundus_edge.gate.metrics import lock_threshold


@pytest.mark.parametrize(("k", "n"), [(0, 40), (0, 300), (1, 300), (6, 532), (30, 100)])
def test_clopper_pearson_matches_the_beta_quantile(k: int, n: int) -> None:
    assert clopper_pearson_upper(k, n, 0.95) == pytest.approx(stats.beta.ppf(0.95, k + 1, n - k), abs=1e-9)


def test_zero_flips_need_299_images_for_a_one_percent_bound() -> None:
    # the "rule of three": 0/n shows rate <= 1 % at 95 % only from n = 299 on
    assert clopper_pearson_upper(0, 298) > 0.01 >= clopper_pearson_upper(0, 299)


def test_wilson_and_newcombe_against_published_values() -> None:
    lo, hi = wilson(81, 263, 1.959964)  # Newcombe 1998 (Stat Med 17:857), example 81/263: 0.2553-0.3662
    assert lo == pytest.approx(0.2553, abs=1e-4) and hi == pytest.approx(0.3662, abs=1e-4)
    # more discordance against the candidate moves the bound down; identical models give a bound near 0
    assert paired_difference_lower(90, 0, 5, 5) < paired_difference_lower(90, 0, 1, 9) < 0
    assert -0.03 < paired_difference_lower(300, 0, 0, 30) < 0


def test_newcombe_lower_bound_covers_the_true_difference() -> None:
    """Simulated paired tables (200 referable images, true Δsensitivity -0.02): the one-sided 95 % lower bound
    lies below the truth in at least ~95 % of samples (Newcombe's method is slightly conservative)."""
    rng = np.random.default_rng(0)
    p = np.array([0.85, 0.03, 0.05, 0.07])  # a (both detect), b (only int8), c (only fp32), d (neither)
    tables = rng.multinomial(200, p, size=2000)
    covered = np.mean([paired_difference_lower(*map(int, t)) <= p[1] - p[2] for t in tables])
    assert 0.94 <= covered <= 0.995


def _scores(n: int, seed: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    return y, np.clip(rng.normal(0.3 + 0.35 * y, 0.2), 0, 1)


def test_forty_images_are_insufficient_evidence_with_the_n_that_would_do() -> None:
    y, s = _scores(40)
    t = lock_threshold(y, s)
    g = gate("int8", y, s, s + 1e-4, t, GateCriteria(n_boot=200))  # nearly identical: no harm seen
    assert g.verdict == INSUFFICIENT and not g.failures and not g
    assert g.evidence is not None
    flips = next(f for f in g.evidence.findings if f.name == "flip_rate")
    assert flips.estimate == 0 and flips.bound > 0.07 and flips.verdict == INSUFFICIENT and flips.n_needed == 299
    sens = next(f for f in g.evidence.findings if f.name == "delta_sensitivity")
    assert sens.verdict == INSUFFICIENT and sens.n_needed is not None and sens.n_needed > 40
    assert g.to_dict()["verdict"] == "INSUFFICIENT EVIDENCE" and g.to_dict()["insufficient"]


def test_a_degraded_candidate_fails_and_an_identical_one_passes_on_many_images() -> None:
    y, s = _scores(3000)
    t = lock_threshold(y, s)
    rng = np.random.default_rng(1)
    bad = gate("noisy", y, s, np.clip(s + rng.normal(0, 0.15, len(s)), 0, 1), t, GateCriteria(n_boot=200))
    assert bad.verdict == FAIL and any("flipped" in f for f in bad.failures)
    same = gate("same", y, s, s.copy(), t, GateCriteria(n_boot=200))
    assert same.verdict == PASS and same and same.evidence is not None
    assert all(f.verdict == PASS for f in same.evidence.findings)


def test_flips_are_split_by_the_fp32_uncertainty_band() -> None:
    y, s = _scores(400)
    t = lock_threshold(y, s)
    lo, hi = threshold_band(y, s, "sensitivity>=0.90", t)
    assert lo <= t <= hi and hi - lo < 0.3
    cand = s.copy()
    near = np.flatnonzero((s >= lo) & (s <= hi))[:3]
    far = np.flatnonzero(s > hi + 0.2)[:2]
    cand[near] = np.where(s[near] >= t, t - 1e-6, t + 1e-6)  # flip three images next to the threshold
    cand[far] = 0.0  # and two clear-cut referable ones
    g = gate("int8", y, s, cand, t, GateCriteria(n_boot=100))
    assert g.flips == 5 and g.evidence is not None
    assert (g.evidence.flips_in_band, g.evidence.flips_outside_band) == (3, 2)


def test_stratified_split_is_disjoint_seeded_and_balanced() -> None:
    y, _ = _scores(301)
    a, b = stratified_split(y, seed=3)
    a2, _ = stratified_split(y, seed=3)
    assert np.array_equal(a, a2) and not set(a) & set(b) and len(a) + len(b) == len(y)
    assert abs(y[a].mean() - y[b].mean()) < 0.02


def test_operating_point_drift_against_the_build_targets() -> None:
    goal = targets("sensitivity>=0.90", 0.91, 0.70)
    assert goal == {"sensitivity": 0.90, "specificity": 0.70}
    y = np.r_[np.ones(200), np.zeros(200)].astype(int)
    s = np.r_[np.r_[np.ones(160), np.zeros(40)], np.r_[np.zeros(150), np.ones(50)]]  # sens 0.80, spec 0.75
    found = {d.metric: d for d in operating_point_drift("onnx-fp32", y, s, 0.5, goal)}
    assert found["sensitivity"].status == "DRIFT" and found["sensitivity"].ci[1] < 0.90
    assert found["specificity"].status == "OK"
    # the same sensitivity (0.80) on 10 referable images is below target but not significantly: BELOW, not DRIFT
    ys, ss = np.r_[np.ones(10), np.zeros(10)].astype(int), np.r_[np.ones(8), np.zeros(12)]
    small = {d.metric: d for d in operating_point_drift("x", ys, ss, 0.5, goal)}
    assert small["sensitivity"].status == "BELOW" and small["sensitivity"].ci[1] >= 0.90
