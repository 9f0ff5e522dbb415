from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fundus_edge.datasets.labels import list_images, read_labels
from fundus_edge.errors import DataError


def _images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        Image.new("RGB", (64, 64), (120, 40, 20)).save(folder / n)


@pytest.mark.parametrize(
    ("header", "rows", "layout", "files"),
    [
        ("id_code,diagnosis", ["a1,0", "b2,2", "c3,4"], "aptos", ["a1.png", "b2.png", "c3.png"]),
        ("image,level", ["a1,1", "b2.jpeg,3", "c3,0"], "eyepacs", ["a1.jpeg", "b2.jpeg", "c3.jpeg"]),
        ("Image name,Retinopathy grade,Risk of macular edema", ["IDRiD_01,2,0", "IDRiD_02,1,0", "IDRiD_03,0,0"],
         "idrid", ["IDRiD_01.jpg", "IDRiD_02.jpg", "IDRiD_03.jpg"]),
        ("path,label", ["imgs/x.png,2", "imgs/y.png,0", "imgs/z.png,1"], "generic",
         ["imgs/x.png", "imgs/y.png", "imgs/z.png"]),
    ],
)
def test_layouts(tmp_path: Path, header: str, rows: list[str], layout: str, files: list[str]) -> None:
    for f in files:
        _images(tmp_path / Path(f).parent, [Path(f).name])
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("\n".join([header, *rows]) + "\n")
    s = read_labels(csv_path)
    assert s.layout == layout
    assert len(s) == 3 and not s.problems
    assert s.referable == [int(g >= 2) for g in s.grades]


def test_images_subfolder_and_configurable_threshold(tmp_path: Path) -> None:
    _images(tmp_path / "images", ["p.png", "q.png"])
    (tmp_path / "l.csv").write_text("id_code,diagnosis\np,1\nq,3\n")
    s = read_labels(tmp_path / "l.csv", referable_from=1)
    assert s.referable == [1, 1]


def test_bad_rows_reported_not_fatal(tmp_path: Path) -> None:
    _images(tmp_path, ["ok.png"])
    (tmp_path / "l.csv").write_text("image,level\nok.png,2\nmissing.png,1\nok.png,abc\n,\n")
    s = read_labels(tmp_path / "l.csv")
    assert len(s) == 1
    assert len(s.problems) == 2
    assert any("missing.png" in p and "not found" in p for p in s.problems)
    assert any("unreadable" in p for p in s.problems)


def test_unusable_files_raise(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_labels(tmp_path / "none.csv")
    (tmp_path / "h.csv").write_text("file,grade\na,1\n")
    with pytest.raises(DataError, match="matches no known layout"):
        read_labels(tmp_path / "h.csv")
    (tmp_path / "e.csv").write_text("image,level\nnothing.png,1\n")
    with pytest.raises(DataError, match="no usable rows"):
        read_labels(tmp_path / "e.csv")
    with pytest.raises(DataError):
        list_images(tmp_path / "nope")
