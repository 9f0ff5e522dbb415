"""Vessel biomarkers (runtime/biomarkers.py) on synthetic shapes with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from fundus_edge.errors import UsageError
from fundus_edge.runtime.biomarkers import box_counts, fractal_dimension, vessel_biomarkers, vessel_density


def test_density_counts_only_inside_the_fov() -> None:
    v = np.zeros((100, 100), bool)
    v[:, :10] = True  # 1000 vessel pixels, half of them outside the FOV below
    fov = np.zeros_like(v)
    fov[:50] = True
    assert vessel_density(v, fov) == pytest.approx(500 / 5000)
    assert vessel_density(v) == pytest.approx(0.1)
    assert vessel_density(v, np.zeros_like(v)) == 0.0


def test_filled_square_has_dimension_two() -> None:
    v = np.ones((512, 512), bool)
    fit = fractal_dimension(v)
    assert fit.dimension == pytest.approx(2.0, abs=0.01) and fit.r2 > 0.999


@pytest.mark.parametrize("shape", ["horizontal", "diagonal"])
def test_line_has_dimension_one(shape: str) -> None:
    v = np.zeros((512, 512), bool)
    if shape == "horizontal":
        v[200, 10:500] = True
    else:
        np.fill_diagonal(v, True)
    assert fractal_dimension(v).dimension == pytest.approx(1.0, abs=0.05)


def test_sierpinski_carpet_dimension() -> None:
    """log 8 / log 3 = 1.8928 for the Sierpinski carpet, box sides matched to its scale (powers of 3)."""
    v = np.ones((1, 1), bool)
    for _ in range(6):  # 729 x 729
        z = np.zeros_like(v)
        v = np.block([[v, v, v], [v, z, v], [v, v, v]])
    sizes = [3**k for k in range(1, 5)]
    counts = box_counts(v, sizes)
    slope = np.polyfit(np.log(1 / np.asarray(sizes, float)), np.log(counts), 1)[0]
    assert slope == pytest.approx(np.log(8) / np.log(3), abs=1e-6)
    assert 1.8 < fractal_dimension(v).dimension < 2.0  # power-of-two boxes: close, not exact


def test_branching_tree_lies_between_line_and_plane() -> None:
    """A binary tree of thin segments, like a vessel tree: dimension strictly between 1 and 2."""
    v = np.zeros((1024, 1024), bool)

    def branch(x: float, y: float, angle: float, length: float, depth: int) -> None:
        if depth == 0:
            return
        t = np.linspace(0, 1, int(length * 2) + 2)
        xs, ys = x + t * length * np.cos(angle), y + t * length * np.sin(angle)
        ok = (xs >= 0) & (xs < 1024) & (ys >= 0) & (ys < 1024)
        v[ys[ok].astype(int), xs[ok].astype(int)] = True
        x2, y2 = x + length * np.cos(angle), y + length * np.sin(angle)
        branch(x2, y2, angle - 0.5, length * 0.7, depth - 1)
        branch(x2, y2, angle + 0.5, length * 0.7, depth - 1)

    branch(512, 1000, -np.pi / 2, 300, 11)
    d = fractal_dimension(v).dimension
    assert 1.1 < d < 1.9
    bio = vessel_biomarkers(v)
    assert bio.vessel_pixels == int(v.sum()) and bio.fov_pixels == v.size
    assert bio.to_dict()["fractal_dimension"] == round(d, 4)


def test_empty_and_bad_inputs() -> None:
    assert fractal_dimension(np.zeros((64, 64), bool)).dimension == 0.0
    with pytest.raises(UsageError, match="2-D"):
        vessel_density(np.zeros((4, 4, 3)))
    with pytest.raises(UsageError, match="differ in shape"):
        vessel_density(np.zeros((4, 4)), np.zeros((5, 4)))
    with pytest.raises(UsageError, match="too small"):
        fractal_dimension(np.ones((3, 3), bool))
