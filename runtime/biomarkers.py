"""Vessel biomarkers from a binary vessel map (numpy only): vessel density inside the field of view and the
box-counting (Minkowski-Bouligand) fractal dimension, the two most reported global retinal vascular measures
(e.g. Liew et al. 2008, "The retinal vasculature as a fractal"; SIVA and VAMPIRE report both).

The numbers depend on the segmentation and on the working resolution: compare them between photos processed the
same way, never against published values from other pipelines.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import UsageError


@dataclass(frozen=True)
class FractalFit:
    dimension: float  # slope of log N(s) against log(1/s)
    r2: float  # goodness of the straight-line fit; a poor fit means no scaling range
    sizes: tuple[int, ...]  # box sides used
    counts: tuple[int, ...]  # occupied boxes at each side


@dataclass(frozen=True)
class VesselBiomarkers:
    density: float  # vessel pixels / FOV pixels
    fractal_dimension: float
    fractal_r2: float
    vessel_pixels: int
    fov_pixels: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _check(vessels: np.ndarray, fov: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(vessels)
    if v.ndim != 2:
        raise UsageError(f"a vessel map must be 2-D (h, w), got shape {v.shape}")
    v = v.astype(bool)
    f = np.ones_like(v) if fov is None else np.asarray(fov).astype(bool)
    if f.shape != v.shape:
        raise UsageError(f"the FOV mask {f.shape} and the vessel map {v.shape} differ in shape")
    return v, f


def vessel_density(vessels: np.ndarray, fov: np.ndarray | None = None) -> float:
    """Fraction of FOV pixels that are vessel (0 when the FOV is empty)."""
    v, f = _check(vessels, fov)
    n = int(f.sum())
    return float((v & f).sum() / n) if n else 0.0


def box_counts(vessels: np.ndarray, sizes: list[int]) -> list[int]:
    """Number of s x s boxes (a grid anchored at the top-left, zero-padded) that hold any vessel pixel."""
    v = np.asarray(vessels).astype(bool)
    out = []
    for s in sizes:
        h, w = -(-v.shape[0] // s) * s, -(-v.shape[1] // s) * s
        grid = np.zeros((h, w), bool)
        grid[: v.shape[0], : v.shape[1]] = v
        out.append(int(grid.reshape(h // s, s, w // s, s).any(axis=(1, 3)).sum()))
    return out


def fractal_dimension(vessels: np.ndarray, fov: np.ndarray | None = None, min_size: int = 2,
                      max_fraction: float = 0.25) -> FractalFit:
    """Box-counting dimension of the vessel pixels inside the FOV: least-squares slope of log N(s) against
    log(1/s) over box sides s = min_size, 2 min_size, ... up to ``max_fraction`` of the map's shorter side,
    on the map cropped to the vessels' bounding box. A filled square gives ~2, a straight line ~1."""
    v, f = _check(vessels, fov)
    v = v & f
    if not v.any():
        return FractalFit(0.0, 0.0, (), ())
    ys, xs = np.flatnonzero(v.any(axis=1)), np.flatnonzero(v.any(axis=0))
    v = v[ys[0]: ys[-1] + 1, xs[0]: xs[-1] + 1]
    top = max(min_size, int(max(v.shape) * max_fraction))
    sizes = [min_size * 2**k for k in range(32) if min_size * 2**k <= top]
    if len(sizes) < 2:
        raise UsageError(f"the vessel map ({v.shape[1]}x{v.shape[0]}) is too small for box counting")
    counts = box_counts(v, sizes)
    x, y = np.log(1.0 / np.asarray(sizes, float)), np.log(np.asarray(counts, float))
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss if ss > 0 else 1.0
    return FractalFit(float(slope), r2, tuple(sizes), tuple(counts))


def vessel_biomarkers(vessels: np.ndarray, fov: np.ndarray | None = None) -> VesselBiomarkers:
    """Density and fractal dimension of a binary vessel map (e.g. probability >= the model's threshold)."""
    v, f = _check(vessels, fov)
    fit = fractal_dimension(v, f)
    return VesselBiomarkers(density=vessel_density(v, f), fractal_dimension=fit.dimension, fractal_r2=fit.r2,
                            vessel_pixels=int((v & f).sum()), fov_pixels=int(f.sum()))
