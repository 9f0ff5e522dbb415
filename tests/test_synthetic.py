from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from fundus_edge.datasets.synthetic import CAMERAS, Lesions, generate, write_dataset
from fundus_edge.errors import UsageError


def test_same_seed_same_pixels_other_seed_other_pixels() -> None:
    a = np.asarray(generate(42, size=256).image)
    b = np.asarray(generate(42, size=256).image)
    c = np.asarray(generate(43, size=256).image)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("grade", range(5))
def test_requested_grade_is_what_was_drawn(grade: int) -> None:
    for seed in range(6):
        item = generate(seed, size=256, grade=grade)
        assert item.grade == item.lesions.grade() == grade


def test_grade_rules() -> None:
    assert Lesions().grade() == 0
    assert Lesions(microaneurysms=3).grade() == 1
    assert Lesions(microaneurysms=3, exudates=1).grade() == 2
    assert Lesions(haemorrhages=20, haemorrhage_quadrants=3).grade() == 2
    assert Lesions(haemorrhages=20, haemorrhage_quadrants=4).grade() == 3
    assert Lesions(new_vessels=True).grade() == 4


def test_image_looks_like_a_fundus() -> None:
    img = np.asarray(generate(1, size=256, camera="desktop").image, dtype=np.float32)
    centre = img[96:160, 96:160].reshape(-1, 3).mean(0)
    corner = img[:20, :20].mean()
    assert corner < 5  # black outside the field of view
    assert centre[0] > centre[1] > centre[2]  # orange-red retina: R > G > B


def test_cameras_differ() -> None:
    means = {c: np.asarray(generate(3, size=128, grade=0, camera=c).image).reshape(-1, 3).mean(0) for c in CAMERAS}
    assert len({tuple(np.round(m)) for m in means.values()}) == len(CAMERAS)


def test_write_dataset(tmp_path: Path) -> None:
    csv_path = write_dataset(tmp_path, 12, seed=5, size=128)
    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12
    assert all((tmp_path / r["image"]).is_file() for r in rows)
    assert {int(r["level"]) for r in rows} <= set(range(5))


def test_bad_arguments() -> None:
    with pytest.raises(UsageError):
        generate(0, size=16)
    with pytest.raises(UsageError):
        generate(0, grade=7)
