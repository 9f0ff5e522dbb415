"""Readers for the openly licensed real fundus sets in the ``open-fundus`` layout (IDRiD, HRF, CHASE_DB1).

The layout (see ``tests/data/open-fundus/PROVENANCE.md`` for credit and licences)::

    idrid/train.csv, idrid/test.csv      image,dr_grade,dme_risk   (image relative to idrid/)
    hrf/images/NN_{h,dr,g}.jpg           healthy / diabetic retinopathy / glaucoma
    hrf/vessels/NN_x.png, hrf/fov/NN_x.png
    chase_db1/images/Image_NNx.jpg       chase_db1/vessels_1st/Image_NNx_1stHO.png (and _2nd)

The full set lives outside the repository (``FUNDUS_EDGE_OPEN_FUNDUS``, or ``../shared/open-fundus`` next to a
checkout); ``tests/data/open-fundus`` holds a small subset in the same layout for tests and the demo.
Numpy-free, torch-free: only paths and labels.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

ENV_VAR = "FUNDUS_EDGE_OPEN_FUNDUS"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
SUBSET = PACKAGE_ROOT / "tests" / "data" / "open-fundus"
# the demo's copy: IDRiD test (all 103) + 64 IDRiD-train calibration photos at 960 px wide, all 45 HRF at half size
DEMO_SUBSET = PACKAGE_ROOT / "tests" / "data" / "open-fundus-demo"
SAMPLES = PACKAGE_ROOT / "tests" / "data" / "fundus"  # CC0 photographs (HRF healthy eyes, scikit-image retina)
# Where the sample photographs come from, for commands that default to them in an install that has none (a wheel).
SAMPLES_HELP = ("the CC0 sample photographs (tests/data/fundus) come with a source checkout or the sdist, not "
                "with the installed wheel: give image files or folders instead")
HRF_DIAGNOSES = {"h": "healthy", "dr": "diabetic retinopathy", "g": "glaucoma"}


@dataclass(frozen=True)
class Photo:
    """One real photograph with what the dataset says about it."""

    path: Path
    dataset: str  # "idrid" | "hrf" | "chase_db1"
    referable: int | None = None  # 1 = referable DR (IDRiD grade >= 2; HRF "dr"), None = unknown
    grade: int | None = None  # IDRiD DR grade 0-4
    diagnosis: str | None = None  # HRF: healthy / diabetic retinopathy / glaucoma
    vessels: Path | None = None  # expert vessel mask (first observer for CHASE_DB1)
    fov: Path | None = None  # expert field-of-view mask (HRF)


def find_root(explicit: str | os.PathLike[str] | None = None, full: bool = True) -> Path:
    """The open-fundus folder: ``explicit``, else ``$FUNDUS_EDGE_OPEN_FUNDUS``, else ``../shared/open-fundus``
    next to the checkout (``full``), else the repository's subset."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    elif os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]))
    else:
        if full:
            candidates += [PACKAGE_ROOT.parent / "shared" / "open-fundus", PACKAGE_ROOT / "shared" / "open-fundus"]
        candidates.append(SUBSET)
    for c in candidates:
        if (c / "idrid").is_dir() or (c / "hrf").is_dir() or (c / "chase_db1").is_dir():
            return c
    raise DataError(f"no open-fundus data at {', '.join(map(str, candidates))}; set {ENV_VAR} to the folder that "
                    "holds idrid/, hrf/ and chase_db1/")


def demo_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The demo's data: ``explicit`` / ``$FUNDUS_EDGE_OPEN_FUNDUS`` / ``../shared/open-fundus`` when there, else the
    repository's demo copy (``tests/data/open-fundus-demo``), so ``make demo`` runs on a fresh clone."""
    root = find_root(explicit)
    if root.resolve() == SUBSET.resolve() and (DEMO_SUBSET / "idrid").is_dir():
        return DEMO_SUBSET
    return root


def idrid(root: Path, split: str = "test", referable_from: int = 2) -> list[Photo]:
    """IDRiD disease-grading photographs of one split ("train" or "test") with their DR grades."""
    csv_path = root / "idrid" / f"{split}.csv"
    if not csv_path.is_file():
        return []
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for r in rows:
        grade = int(r["dr_grade"])
        p = root / "idrid" / r["image"]
        if p.is_file():
            out.append(Photo(p, "idrid", referable=int(grade >= referable_from), grade=grade))
    return out


def hrf(root: Path) -> list[Photo]:
    """HRF photographs: referable = the dataset's DR diagnosis (healthy and glaucoma eyes are non-DR)."""
    folder = root / "hrf" / "images"
    out = []
    for p in sorted(folder.glob("*.jpg")) if folder.is_dir() else []:
        code = p.stem.split("_", 1)[-1].lower()
        vessels, fov = root / "hrf" / "vessels" / f"{p.stem}.png", root / "hrf" / "fov" / f"{p.stem}.png"
        out.append(Photo(p, "hrf", referable=int(code == "dr"), diagnosis=HRF_DIAGNOSES.get(code),
                         vessels=vessels if vessels.is_file() else None, fov=fov if fov.is_file() else None))
    return out


def chase_db1(root: Path, observer: int = 1) -> list[Photo]:
    """CHASE_DB1 photographs of children's eyes with one observer's vessel masks (no DR labels, no FOV masks)."""
    folder = root / "chase_db1" / "images"
    tag = {1: "1st", 2: "2nd"}[observer]
    out = []
    for p in sorted(folder.glob("*.jpg")) if folder.is_dir() else []:
        m = root / "chase_db1" / f"vessels_{tag}" / f"{p.stem}_{tag}HO.png"
        out.append(Photo(p, "chase_db1", vessels=m if m.is_file() else None))
    return out


def all_photos(root: Path) -> list[Photo]:
    """Every photograph of the three sets (IDRiD train + test, HRF, CHASE_DB1)."""
    return idrid(root, "train") + idrid(root, "test") + hrf(root) + chase_db1(root)


def sample_photos() -> list[Path]:
    """The CC0 sample photographs (sorted); a DataError that says where they come from when this install has none."""
    found = sorted(p for p in SAMPLES.glob("*.jpg")) if SAMPLES.is_dir() else []
    if not found:
        raise DataError(f"no sample photographs at {SAMPLES}: {SAMPLES_HELP}")
    return found
