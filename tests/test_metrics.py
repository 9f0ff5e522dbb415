from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score

from fundus_edge.errors import DataError, UsageError
from fundus_edge.gate.gate import GateCriteria, gate
from fundus_edge.gate.metrics import (
    auc,
    bootstrap_auc_ci,
    lock_threshold,
    sensitivity_specificity,
)


def _data(seed: int, n: int = 400) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    s = np.clip(rng.normal(0.3 + 0.35 * y, 0.2), 0, 1)
    s = np.round(s, 2)  # plenty of ties
    return y, s


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn(seed: int) -> None:
    y, s = _data(seed)
    assert auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_sensitivity_specificity_match_sklearn(seed: int) -> None:
    y, s = _data(seed)
    t = 0.5
    tn, fp, fn, tp = confusion_matrix(y, (s >= t).astype(int)).ravel()
    sens, spec = sensitivity_specificity(y, s, t)
    assert sens == pytest.approx(tp / (tp + fn))
    assert spec == pytest.approx(tn / (tn + fp))


def test_locked_threshold_reaches_target_sensitivity_and_is_the_highest() -> None:
    y, s = _data(7)
    t = lock_threshold(y, s, "sensitivity>=0.90")
    sens, spec = sensitivity_specificity(y, s, t)
    assert sens >= 0.90
    assert not np.any(s == t)  # no image sits on the threshold
    # the highest score-threshold reaching the target gives the very same decisions
    anchor = min(u for u in np.unique(s) if sensitivity_specificity(y, s, float(u))[0] >= 0.90 and u > t)
    assert sensitivity_specificity(y, s, float(anchor)) == (sens, spec)
    higher = np.unique(s[s > anchor])
    if len(higher):
        assert sensitivity_specificity(y, s, float(higher.min()))[0] < 0.90


def test_youden_threshold_maximises_j() -> None:
    y, s = _data(8)
    t = lock_threshold(y, s, "youden")
    best = max(sum(sensitivity_specificity(y, s, float(u))) for u in np.unique(s))
    assert sum(sensitivity_specificity(y, s, t)) == pytest.approx(best)
    assert not np.any(s == t)


def test_bad_rule_and_one_class() -> None:
    y, s = _data(1)
    with pytest.raises(UsageError):
        lock_threshold(y, s, "precision>=0.9")
    with pytest.raises(DataError):
        auc(np.ones(5), np.arange(5.0))


def test_bootstrap_ci_reproducible_and_equal_to_direct_resampling() -> None:
    y, s = _data(3, 200)
    a = bootstrap_auc_ci(y, s, n_boot=300, seed=11)
    b = bootstrap_auc_ci(y, s, n_boot=300, seed=11)
    assert a == b
    rng = np.random.default_rng(11)
    vals = []
    while len(vals) < 300:
        idx = rng.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(y):
            vals.append(roc_auc_score(y[idx], s[idx]))
    assert a.low == pytest.approx(np.quantile(vals, 0.025))
    assert a.high == pytest.approx(np.quantile(vals, 0.975))
    assert a.low < auc(y, s) < a.high


def test_gate_passes_identical_and_fails_degraded() -> None:
    y, s = _data(4, 2000)  # enough images for the bounds to show the default margins (docs/gate.md)
    crit = GateCriteria(n_boot=100)
    t = lock_threshold(y, s)
    same = gate("same", y, s, s.copy(), t, crit)
    assert same and same.flips == 0 and same.delta_auc == 0 and same.verdict == "PASS"
    rng = np.random.default_rng(0)
    noisy = np.clip(s + rng.normal(0, 0.15, len(s)), 0, 1)
    bad = gate("noisy", y, s, noisy, t, crit)
    assert not bad
    assert any("flipped" in f for f in bad.failures)
    assert bad.to_dict()["passed"] is False
