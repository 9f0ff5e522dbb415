"""Field-of-view detection: the circular retina of a fundus photograph, found on a small proxy image.

Numpy + pillow only; part of the one preprocessing implementation (:mod:`.preprocess` crops around it, and
:mod:`.quality` measures inside it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from .preprocess import PreprocessSpec


@dataclass(frozen=True)
class FieldOfView:
    """The detected circular field of view, in the decoded image's pixel coordinates."""

    cx: float
    cy: float
    radius: float
    found: bool
    coverage: float  # fraction of the decoded image that is retina
    clipped: bool  # the circle runs past the image edge (common: top/bottom cut)
    # "circle", "frame-inside-fov" (lit to the frame's edges: the circle is the frame's circumscribed one), or
    # why no field of view was found (found=False)
    reason: str = "circle"

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def scaled(self, sx: float, sy: float) -> FieldOfView:
        """The same circle in coordinates scaled by (sx, sy) (e.g. from the draft-decoded frame to the photo's)."""
        return replace(self, cx=self.cx * sx, cy=self.cy * sy, radius=self.radius * math.sqrt(sx * sy))



# Field-of-view detection: a robust threshold between the surround's and the retina's level, the outermost lit
# pixel of every row and column (interior shadows do not move it), sub-pixel crossings, and a RANSAC circle fit
# that ignores marks in the surround and boundary points on the frame's edge (a circle cut by the frame).
_FOV_RANSAC = 96  # candidate circles (vectorised; deterministic seed)
_FOV_MIN_INLIERS = 0.5  # share of boundary points the circle must explain
_FOV_MIN_LEVEL = 8.0  # grey levels: a frame whose bright pixels are darker than this has nothing to find
# No dark surround in the frame (all retina, or not a fundus): its darkest 2 % are above this fraction of the 95th
# percentile and above _FOV_BLACK grey levels (a fundus camera's surround is black, however dim the retina).
_FOV_NO_SURROUND = 0.2
_FOV_BLACK = 12.0


def _boundary_points(v: np.ndarray, thr: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Outermost above-threshold pixel of each row and column, as sub-pixel crossings (x, y) in proxy pixels;
    points on the frame's edge are dropped. Also returns the share of the frame's edge pixels that are lit."""
    lit = v > thr
    edge_lit = float(np.r_[lit[0], lit[-1], lit[:, 0], lit[:, -1]].mean())
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for arr, flip in ((v, False), (v.T, True)):
        m = arr > thr
        n = arr.shape[1]
        any_ = m.any(axis=1)
        first = np.argmax(m, axis=1)
        last = n - 1 - np.argmax(m[:, ::-1], axis=1)
        rows = np.arange(arr.shape[0])
        for idx, step in ((first, -1), (last, 1)):
            ok = any_ & (idx > 0) & (idx < n - 1)
            r, i = rows[ok], idx[ok]
            inside, outside = arr[r, i], arr[r, i + step]
            frac = np.clip((inside - thr) / np.maximum(inside - outside, 1e-3), 0.0, 1.0)
            pos = i + 0.5 + step * frac  # pixel centres at i + 0.5; the crossing lies toward the outside
            px, py = (r + 0.5, pos) if flip else (pos, r + 0.5)
            xs.append(np.asarray(px, np.float64))
            ys.append(np.asarray(py, np.float64))
    return np.concatenate(xs), np.concatenate(ys), edge_lit


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Algebraic least-squares circle (Kasa) through the points."""
    a = np.c_[x, y, np.ones_like(x)]
    sol = np.linalg.lstsq(a, x * x + y * y, rcond=None)[0]
    cx, cy = 0.5 * float(sol[0]), 0.5 * float(sol[1])
    return cx, cy, math.sqrt(max(float(sol[2]) + cx * cx + cy * cy, 0.0))


def _ransac_circle(x: np.ndarray, y: np.ndarray, tol: float) -> tuple[float, float, float, np.ndarray]:
    """The circle through three boundary points that explains most of them (within ``tol``), refitted on its
    inliers. Deterministic."""
    rng = np.random.default_rng(0)
    n = x.size
    idx = rng.integers(0, n, size=(_FOV_RANSAC, 3))
    x1, x2, x3 = x[idx[:, 0]], x[idx[:, 1]], x[idx[:, 2]]
    y1, y2, y3 = y[idx[:, 0]], y[idx[:, 1]], y[idx[:, 2]]
    d = 2.0 * (x1 * (y2 - y3) + x2 * (y3 - y1) + x3 * (y1 - y2))
    ok = np.abs(d) > 1e-6
    d = np.where(ok, d, 1.0)
    s1, s2, s3 = x1 * x1 + y1 * y1, x2 * x2 + y2 * y2, x3 * x3 + y3 * y3
    cx = (s1 * (y2 - y3) + s2 * (y3 - y1) + s3 * (y1 - y2)) / d
    cy = (s1 * (x3 - x2) + s2 * (x1 - x3) + s3 * (x2 - x1)) / d
    r = np.hypot(x1 - cx, y1 - cy)
    resid = np.abs(np.hypot(x[None, :] - cx[:, None], y[None, :] - cy[:, None]) - r[:, None])
    votes = np.where(ok, (resid <= tol).sum(axis=1), -1)
    inl = resid[int(np.argmax(votes))] <= tol
    for _ in range(2):  # refit on the inliers, then re-select them around the refined circle
        fcx, fcy, fr = _fit_circle(x[inl], y[inl])
        inl = np.abs(np.hypot(x - fcx, y - fcy) - fr) <= tol
        if inl.sum() < 3:
            break
    return fcx, fcy, fr, inl


def detect_fov(img: Image.Image, spec: PreprocessSpec) -> FieldOfView:
    """Find the circular field of view on a small proxy of ``img`` (RGB), in ``img``'s pixel coordinates.

    Threshold: ``fov_threshold`` of the way from the surround's level (2nd percentile) to the retina's (95th),
    so an under-exposed frame gets a proportionally lower threshold. Boundary: the outermost lit pixel of each
    row and column (a dark or shadowed centre does not move it), at sub-pixel precision; points on the frame's
    edge are left out (circles cut at the top and bottom). Circle: RANSAC, so burnt-in text and notches in the
    surround are outliers. Outcomes (``FieldOfView.reason``): ``circle``; ``frame-inside-fov`` when the frame
    is lit to its edges all round (a camera that crops inside the field of view: the circle is then the
    frame's circumscribed circle, the smallest one consistent with the picture); otherwise ``found=False``
    with the reason and the centred fallback circle.
    """
    w, h = img.size
    factor = max(1, max(w, h) // spec.proxy_size)
    proxy = img.reduce(factor) if factor > 1 else img
    v = np.asarray(proxy, dtype=np.float32).max(axis=2)
    ph, pw = v.shape
    sx = sy = float(factor)  # proxy pixel i covers pixels [i * factor, (i + 1) * factor) of img
    lo, hi = (float(q) for q in np.percentile(v, (2, 95)))
    if hi < _FOV_MIN_LEVEL:
        return _fallback_fov(w, h, 0.0, "too dark: no lit field of view")
    if lo > max(_FOV_NO_SURROUND * hi, _FOV_BLACK):  # not even 2 % of the frame is black: no surround
        return _frame_inside(w, h, 1.0)
    thr = lo + max(spec.fov_threshold * (hi - lo), 3.0)
    coverage = float((v > thr).mean())
    x, y, edge_lit = _boundary_points(v, thr)
    # Lit to the edges nearly all round (at most dark corners): the frame lies inside the field of view.
    inside = coverage >= 0.85 and edge_lit >= 0.8
    if edge_lit >= 0.97 or x.size < 12:
        return _frame_inside(w, h, coverage) if inside else _fallback_fov(w, h, coverage, "no field-of-view boundary")
    if coverage < 0.05:
        return _fallback_fov(w, h, coverage, "lit area too small")
    cx, cy, r, inl = _ransac_circle(x, y, tol=max(1.0, 0.01 * max(pw, ph)))
    n_in = int(inl.sum())
    if n_in < max(12, _FOV_MIN_INLIERS * x.size) or not 0.15 * min(pw, ph) <= r <= 0.8 * math.hypot(pw, ph):
        return _frame_inside(w, h, coverage) if inside else _fallback_fov(w, h, coverage, "no circular boundary")
    if not (-0.25 * pw <= cx <= 1.25 * pw and -0.25 * ph <= cy <= 1.25 * ph):
        return _fallback_fov(w, h, coverage, "circle centre outside the frame")
    clipped = cx - r < -0.5 or cx + r > pw + 0.5 or cy - r < -0.5 or cy + r > ph + 0.5
    return FieldOfView(cx=cx * sx, cy=cy * sy, radius=r * sx, found=True, coverage=coverage,
                       clipped=bool(clipped))


def _frame_inside(w: int, h: int, coverage: float) -> FieldOfView:
    """The frame lies inside the field of view: the smallest circle consistent with it, its circumscribed one."""
    return FieldOfView(cx=w / 2.0, cy=h / 2.0, radius=0.5 * math.hypot(w, h), found=True, coverage=coverage,
                       clipped=True, reason="frame-inside-fov")


def _fallback_fov(w: int, h: int, coverage: float, reason: str) -> FieldOfView:
    return FieldOfView(cx=w / 2.0, cy=h / 2.0, radius=min(w, h) / 2.0, found=False, coverage=coverage, clipped=False,
                       reason=reason)


__all__ = ["FieldOfView", "detect_fov"]
