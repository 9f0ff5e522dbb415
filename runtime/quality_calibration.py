"""``fundus-edge quality calibrate``: pick quality thresholds for one camera from labelled example photos.

Colour and thresholds do not transfer between cameras, so each camera gets its own spec. Given a folder of
acceptable ("good") photographs and one of unacceptable ("bad") ones, each measure's bound is moved next to
the good photos' distribution (a tail quantile plus a slack of at least one unit of the measure's scale) where
the bad photos show that the default bound lets some of them through; bounds that reject good photos are
loosened until at least ``target_pass`` of the good photos pass every measure. Per measure and combined, the
report gives the ROC AUC for good vs bad, the share of good photos passing and the share of bad ones caught.

Numpy only (no scikit-learn, no torch): it runs with the device install.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError, ImageError, UsageError
from ..gate.metrics import auc
from .preprocess import PreprocessSpec
from .quality import MEASURES, Bounds, QualitySpec, assess_source, judge

Progress = Callable[[int, int], None]


@dataclass
class MeasuredSet:
    """Quality measures of a set of images, with the files that could not be read."""

    sources: list[str]
    measures: list[dict[str, float]]
    skipped: list[dict[str, str]]

    def column(self, name: str) -> np.ndarray:
        return np.array([m[name] for m in self.measures], dtype=np.float64)


def measure_images(sources: Sequence[str | os.PathLike[str]], spec: QualitySpec,
                   preprocessing: PreprocessSpec | None = None, progress: Progress | None = None) -> MeasuredSet:
    """Every quality measure of every image (unreadable images are recorded and skipped)."""
    out = MeasuredSet([], [], [])
    for i, src in enumerate(sources):
        try:
            result, _ = assess_source(src, spec, preprocessing)
            out.sources.append(str(src))
            out.measures.append(result.measures)
        except ImageError as exc:
            out.skipped.append({"source": str(src), "code": exc.code, "message": str(exc)})
        if progress is not None:
            progress(i + 1, len(sources))
    return out


@dataclass(frozen=True)
class MeasureCalibration:
    name: str
    before: Bounds
    after: Bounds
    auc: float | None  # good vs bad, oriented by the bound (1.0: the measure alone separates them)
    good_pass: float  # share of good photos inside the new bounds
    bad_caught: float  # share of bad photos outside the new bounds
    action: str  # "kept" | "tightened" | "loosened"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "before": self.before.to_dict(), "after": self.after.to_dict(), "auc": self.auc,
                "good_pass": self.good_pass, "bad_caught": self.bad_caught, "action": self.action}


@dataclass
class CalibrationResult:
    spec: QualitySpec
    base: QualitySpec
    measures: list[MeasureCalibration]
    n_good: int
    n_bad: int
    skipped: list[dict[str, str]]
    good_pass: float
    bad_rejected: float
    combined_auc: float | None
    base_good_pass: float
    base_bad_rejected: float
    base_combined_auc: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"n_good": self.n_good, "n_bad": self.n_bad, "skipped": self.skipped,
                "calibrated": {"good_pass": self.good_pass, "bad_rejected": self.bad_rejected,
                               "combined_auc": self.combined_auc},
                "base": {"good_pass": self.base_good_pass, "bad_rejected": self.base_bad_rejected,
                         "combined_auc": self.base_combined_auc, "source": self.base.source},
                "measures": [m.to_dict() for m in self.measures], "spec": self.spec.to_dict()}

    def text(self) -> str:
        def b(x: Bounds) -> str:
            lo = "-" if x.min is None else f"{x.min:.4g}"
            hi = "-" if x.max is None else f"{x.max:.4g}"
            return f"[{lo}, {hi}]"

        def a(v: float | None) -> str:
            return "  -  " if v is None else f"{v:.3f}"

        lines = [f"{self.n_good} good, {self.n_bad} bad photographs ({len(self.skipped)} unreadable, skipped)",
                 f"{'measure':<14} {'AUC':>6}  {'bounds before':<22} {'bounds after':<22} {'good pass':>9} "
                 f"{'bad caught':>10}  action"]
        for m in self.measures:
            lines.append(f"{m.name:<14} {a(m.auc):>6}  {b(m.before):<22} {b(m.after):<22} {m.good_pass:>9.1%} "
                         f"{m.bad_caught:>10.1%}  {m.action}")
        lines.append(f"combined score AUC {a(self.combined_auc)} (before {a(self.base_combined_auc)}); good photos "
                     f"passing {self.good_pass:.1%} (before {self.base_good_pass:.1%}); bad photos rejected "
                     f"{self.bad_rejected:.1%} (before {self.base_bad_rejected:.1%})")
        return "\n".join(lines)


def _oriented_auc(good: np.ndarray, bad: np.ndarray, bounds: Bounds) -> float | None:
    """AUC of the distance inside the bounds (higher = more acceptable); None without both classes."""
    if len(good) == 0 or len(bad) == 0:
        return None
    margins = np.array([bounds.margin(float(v)) for v in np.r_[good, bad]])
    margins = np.where(np.isfinite(margins), margins, 1e9)
    y = np.r_[np.ones(len(good)), np.zeros(len(bad))]
    return auc(y, margins)


def _robust_scale(values: np.ndarray, base: float) -> float:
    mad = float(np.median(np.abs(values - np.median(values)))) * 1.4826 if len(values) else 0.0
    return float(min(max(mad, 0.25 * base), 4.0 * base))


def _side(good: np.ndarray, bad: np.ndarray, current: float | None, lower: bool, q: float,
          slack: float) -> tuple[float | None, str]:
    """One bound: keep it, tighten it towards the good photos where bad ones slip through, or loosen it."""
    if current is None:
        return None, "kept"
    # The tightest acceptable bound: a tail quantile of the good photos, with some slack.
    limit = float(np.quantile(good, q)) - slack if lower else float(np.quantile(good, 1 - q)) + slack
    if (lower and current > limit) or (not lower and current < limit):
        return limit, "loosened"
    between = bad[(bad > current) & (bad < limit)] if lower else bad[(bad < current) & (bad > limit)]
    if between.size == 0:
        return current, "kept"
    edge = float(between.max()) if lower else float(between.min())
    return (edge + limit) / 2.0, "tightened"


def _inside(values: np.ndarray, b: Bounds) -> np.ndarray:
    ok = np.ones(values.shape, dtype=bool)
    if b.min is not None:
        ok &= values >= b.min
    if b.max is not None:
        ok &= values <= b.max
    return ok


def _pass_matrix(measured: MeasuredSet, spec: QualitySpec) -> np.ndarray:
    """(images, measures) bool: the image is inside that measure's bounds."""
    names = [n for n in MEASURES if n in spec.bounds]
    if not measured.measures:
        return np.ones((0, len(names)), dtype=bool)
    return np.stack([_inside(measured.column(n), spec.bounds[n]) for n in names], axis=1)


def _scores(measured: MeasuredSet, spec: QualitySpec) -> np.ndarray:
    return np.array([judge(m, spec).score for m in measured.measures], dtype=np.float64)


def calibrate(good: MeasuredSet, bad: MeasuredSet, base: QualitySpec | None = None, target_pass: float = 0.97,
              quantile: float = 0.01, source: str | None = None) -> CalibrationResult:
    """A quality spec fitted to one camera's good and bad photographs (see the module docstring)."""
    base = base or QualitySpec()
    if not 0.5 <= target_pass <= 1.0:
        raise UsageError(f"--target-pass must be in [0.5, 1], got {target_pass}")
    if len(good.measures) < 10:
        raise DataError(f"calibration needs at least 10 readable good photographs, got {len(good.measures)}")
    if len(bad.measures) < 1:
        raise DataError("calibration needs bad (ungradable or non-fundus) photographs to measure the AUCs")
    bounds = dict(base.bounds)
    actions: dict[str, str] = {}
    for name, b in base.bounds.items():
        g, x = good.column(name), bad.column(name)
        scale = _robust_scale(g, b.scale)
        # Never closer to the good photos than one unit of the default scale: a few labelled photos do not show
        # all the variation of a camera, and one bad photo should not pull a bound onto the good ones.
        slack = max(0.5 * scale, b.scale)
        lo, act_lo = _side(g, x, b.min, True, quantile, slack)
        hi, act_hi = _side(g, x, b.max, False, quantile, slack)
        bounds[name] = Bounds(min=lo, max=hi, scale=scale)
        acts = {act_lo, act_hi} - {"kept"}
        actions[name] = "loosened" if "loosened" in acts else ("tightened" if acts else "kept")
    names = [n for n in MEASURES if n in bounds]
    columns = {n: good.column(n) for n in names}
    # Loosen the bound that fails the most good photos, one photo at a time, until enough pass every measure.
    for _ in range(len(good.measures) * 2):
        ok = np.stack([_inside(columns[n], bounds[n]) for n in names], axis=1)
        if ok.all(axis=1).mean() >= target_pass:
            break
        worst = names[int(np.argmin(ok.mean(axis=0)))]
        b, g = bounds[worst], columns[worst]
        low = g[g < b.min] if b.min is not None else np.empty(0)
        high = g[g > b.max] if b.max is not None else np.empty(0)
        if low.size >= high.size:
            b = Bounds(min=float(low.max()) - 0.25 * b.scale, max=b.max, scale=b.scale)
        else:
            b = Bounds(min=b.min, max=float(high.min()) + 0.25 * b.scale, scale=b.scale)
        bounds[worst] = b
        actions[worst] = "loosened"
    stamp = _dt.datetime.now(_dt.timezone.utc).date().isoformat()
    spec = QualitySpec(size=base.size, enabled=base.enabled, bounds=bounds,
                       source=source or f"calibrated on {len(good.measures)} good / {len(bad.measures)} bad ({stamp})")
    rows = []
    for n in names:
        g, x = good.column(n), bad.column(n)
        after = spec.bounds[n]
        rows.append(MeasureCalibration(
            n, base.bounds[n], after, _oriented_auc(g, x, after),
            float(np.mean([after.margin(v) >= 0 for v in g])),
            float(np.mean([after.margin(v) < 0 for v in x])), actions[n]))

    def summary(s: QualitySpec) -> tuple[float, float, float | None]:
        gp = float(_pass_matrix(good, s).all(axis=1).mean())
        br = float((~_pass_matrix(bad, s).all(axis=1)).mean())
        sg, sb = _scores(good, s), _scores(bad, s)
        y = np.r_[np.ones(len(sg)), np.zeros(len(sb))]
        return gp, br, auc(y, np.r_[sg, sb])

    gp, br, ca = summary(spec)
    bgp, bbr, bca = summary(base)
    return CalibrationResult(spec, base, rows, len(good.measures), len(bad.measures), good.skipped + bad.skipped,
                             gp, br, ca, bgp, bbr, bca)
