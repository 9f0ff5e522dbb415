"""Labelled image sets: a CSV in one of the common layouts plus a folder of images.

Layouts recognised by header (case-insensitive):
  APTOS    ``id_code,diagnosis``            (id without extension)
  EyePACS  ``image,level``                  (name with or without extension)
  IDRiD    ``Image name,Retinopathy grade`` (name without extension)
  generic  ``path,label``                   (relative to the CSV's folder, or absolute)

Grades map to referable with ``grade >= referable_from`` (2 by default). Rows that cannot be used (no image
found, grade not a number) are reported in :attr:`LabelledSet.problems`, not fatal.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError, UsageError

LAYOUTS: dict[str, tuple[str, str]] = {
    "aptos": ("id_code", "diagnosis"),
    "eyepacs": ("image", "level"),
    "idrid": ("image name", "retinopathy grade"),
    "generic": ("path", "label"),
}
_EXTENSIONS = ("", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".JPG", ".JPEG", ".PNG")


@dataclass
class LabelledSet:
    paths: list[Path]
    grades: list[int]
    referable: list[int]
    layout: str
    problems: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


def _resolve(name: str, image_dir: Path) -> Path | None:
    candidate = Path(name)
    if candidate.is_absolute():
        return candidate if candidate.is_file() else None
    for ext in _EXTENSIONS:
        p = image_dir / (name + ext)
        if p.is_file():
            return p
    return None


def read_labels(csv_path: str | os.PathLike[str], image_dir: str | os.PathLike[str] | None = None,
                referable_from: int = 2) -> LabelledSet:
    """Read a labels CSV; images are looked up in ``image_dir`` (default: the CSV's folder, then ``images/``)."""
    path = Path(csv_path)
    if not path.is_file():
        raise DataError(f"labels file {path} does not exist")
    if referable_from < 1:
        raise UsageError(f"referable_from must be >= 1, got {referable_from}")
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip().lower() for h in next(reader)]
        except StopIteration:
            raise DataError(f"labels file {path} is empty") from None
        layout = next((name for name, cols in LAYOUTS.items() if all(c in header for c in cols)), None)
        if layout is None:
            raise DataError(
                f"{path}: header {header} matches no known layout; use one of "
                + "; ".join(f"{k}: {','.join(v)}" for k, v in LAYOUTS.items())
            )
        i_name, i_grade = (header.index(c) for c in LAYOUTS[layout])
        rows = list(reader)
    base = Path(image_dir) if image_dir else path.parent
    dirs = [base] if image_dir else [base, base / "images", base / "train_images"]
    out = LabelledSet([], [], [], layout)
    for lineno, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        try:
            name, grade_s = row[i_name].strip(), row[i_grade].strip()
            grade = int(float(grade_s))
        except (IndexError, ValueError):
            out.problems.append(f"{path.name}:{lineno}: unreadable row {row!r}")
            continue
        if grade < 0:
            out.problems.append(f"{path.name}:{lineno}: negative grade {grade}")
            continue
        found = next((p for d in dirs if (p := _resolve(name, d)) is not None), None)
        if found is None:
            out.problems.append(f"{path.name}:{lineno}: image {name!r} not found in {', '.join(map(str, dirs))}")
            continue
        out.paths.append(found)
        out.grades.append(grade)
        out.referable.append(int(grade >= referable_from))
    if not out.paths:
        raise DataError(f"{path}: no usable rows ({len(out.problems)} problems, first: "
                        f"{out.problems[0] if out.problems else 'none'})")
    return out


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files in a folder (recursively, sorted) for calibration."""
    from ..runtime.screen import IMAGE_SUFFIXES

    p = Path(folder)
    if not p.is_dir():
        raise DataError(f"calibration folder {p} does not exist")
    files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"calibration folder {p} holds no images")
    return files
