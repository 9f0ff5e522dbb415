"""Validation CSVs for segmentation: ``image,mask[,fov]`` (a header row with those names, paths relative to the
CSV's folder or absolute). Mask images: vessel pixels > 127 (any mode; converted to grey)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError


@dataclass(frozen=True)
class MaskedImage:
    image: Path
    mask: Path
    fov: Path | None = None


def read_masks_csv(path: Path) -> list[MaskedImage]:
    """The rows of a masks CSV; raises :class:`DataError` naming the row when a file is missing."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"masks CSV {path} does not exist")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"image", "mask"} <= set(rows[0]):
        raise DataError(f"{path} is not a masks CSV: it needs a header row 'image,mask[,fov]' and at least one row")
    out = []
    for i, r in enumerate(rows, start=2):
        files = {k: (path.parent / r[k]).resolve() for k in ("image", "mask", "fov") if r.get(k)}
        for k, f in files.items():
            if not f.is_file():
                raise DataError(f"{path} line {i}: the {k} file {f} does not exist")
        out.append(MaskedImage(files["image"], files["mask"], files.get("fov")))
    return out


def write_masks_csv(path: Path, rows: list[MaskedImage]) -> Path:
    """Write ``rows`` as a masks CSV (absolute paths)."""
    with Path(path).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "mask", "fov"])
        for r in rows:
            w.writerow([r.image, r.mask, r.fov or ""])
    return Path(path)
