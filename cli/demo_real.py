"""The demo's first part: the real reference DR model, gated and screened on real photographs.

Data: the open-fundus set (IDRiD, HRF; see ``tests/data/open-fundus/PROVENANCE.md``), from ``../shared`` next to the
checkout when it is there, else the repository's subset. The operating point is locked on the validation photos
(IDRiD test + HRF), so the HRF agreement printed at the end is not an independent test: the model card has the
external numbers (HRF never used for training or for the card's threshold).
"""

from __future__ import annotations

import csv
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..datasets import open_fundus
from ..datasets.open_fundus import Photo

REAL_MODEL = "dr-resnet18s-idrid"
N_CALIB = 64
EXPECTED = {"healthy": "no-refer", "diabetic retinopathy": "refer", "glaucoma": "no-refer"}


@dataclass
class RealData:
    root: Path
    calib: Path  # a folder of calibration photos (IDRiD train, never validation)
    val_csv: Path  # generic path,label CSV: label 1 = referable DR (IDRiD grade >= 2, HRF "dr")
    n_idrid: int
    n_hrf: int
    hrf: list[Photo]

    def description(self) -> str:
        return (f"real photographs: IDRiD official test ({self.n_idrid}, Kowa VX-10, India) + HRF ({self.n_hrf}, "
                f"Canon CR-1, Germany), n={self.n_idrid + self.n_hrf}; from {self.root}")


def prepare_real_data(out: Path, root: Path | None = None) -> RealData:
    """Calibration folder (64 seeded IDRiD-train photos) and the validation CSV (IDRiD test + HRF)."""
    root = root or open_fundus.find_root()
    idrid_test = open_fundus.idrid(root, "test")
    hrf = open_fundus.hrf(root)
    train = open_fundus.idrid(root, "train")
    if not idrid_test or not hrf or not train:
        from ..errors import DataError

        raise DataError(f"{root} lacks IDRiD train/test or HRF photographs; set FUNDUS_EDGE_OPEN_FUNDUS to the "
                        "open-fundus folder")
    calib = out / "data" / "calib-idrid-train"
    shutil.rmtree(calib, ignore_errors=True)
    calib.mkdir(parents=True)
    for p in random.Random(0).sample(train, min(N_CALIB, len(train))):
        shutil.copyfile(p.path, calib / p.path.name)
    val_csv = out / "data" / "val-idrid-test-hrf.csv"
    with val_csv.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for p in [*idrid_test, *hrf]:
            w.writerow([str(p.path.resolve()), p.referable])
    return RealData(root, calib, val_csv, len(idrid_test), len(hrf), hrf)


def build_real(out: Path, data: RealData, force: bool, log: Callable[[str], None]) -> Any:
    """Build the real model's bundle (ONNX + TFLite, fp32 + int8) gated on the real validation photos."""
    from ..pipeline.build import BuildConfig, run_build

    log(f"== build: {REAL_MODEL} (trained on IDRiD train only) -> ONNX + TFLite, fp32 + int8 -> clinical gate on "
        f"{data.description()}")
    return run_build(BuildConfig(model=f"reference:{REAL_MODEL}", out=out / "bundle", calib=data.calib,
                                 val=data.val_csv, referable_from=1, name=REAL_MODEL, force=force,
                                 val_description=data.description(), val_synthetic=False,
                                 allow_insufficient_evidence=True), log=log)


def hrf_agreement(results: list[Any], photos: list[Photo]) -> dict[str, dict[str, int]]:
    """Per HRF diagnosis: how many screenings gave the decision that diagnosis expects (DR -> refer; healthy and
    glaucoma -> no-refer, since the model screens for referable DR only), and how many were ungradable."""
    by_path = {str(p.path): p for p in photos}
    table: dict[str, dict[str, int]] = {d: {"n": 0, "agree": 0, "ungradable": 0, "errors": 0} for d in EXPECTED}
    for r in results:
        photo = by_path.get(str(r.source))
        if photo is None or photo.diagnosis not in table:
            continue
        row = table[photo.diagnosis]
        row["n"] += 1
        if r.error:
            row["errors"] += 1
        elif r.decision == "ungradable":
            row["ungradable"] += 1
        elif r.decision == EXPECTED[photo.diagnosis]:
            row["agree"] += 1
    return table


def agreement_lines(table: dict[str, dict[str, int]], artifact: str) -> list[str]:
    lines = [f"HRF photographs screened with {artifact}: agreement with HRF's own diagnoses "
             "(DR -> refer; healthy, glaucoma -> no-refer)"]
    for diagnosis, row in table.items():
        lines.append(f"  {diagnosis:<21} {row['agree']:>2}/{row['n']:<2} {EXPECTED[diagnosis]:<8}"
                     + (f"  ({row['ungradable']} ungradable)" if row["ungradable"] else "")
                     + (f"  ({row['errors']} errors)" if row["errors"] else ""))
    lines.append("  The threshold was locked on validation photos that include these HRF images, so this agreement "
                 "is not an independent test; see models/cards/" + REAL_MODEL + ".md for the external numbers.")
    return lines
