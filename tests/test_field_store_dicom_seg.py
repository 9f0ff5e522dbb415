"""DICOM inputs and segmentation bundles in the result store (issue 16 item 6, issue 18 item 6): a DICOM's study UID
and laterality are columns of its row, its eye comes from the laterality when --eye is not given, and its patient
name never reaches stdout, stderr, the audit log or an export; a vessel segmentation is stored as a decision-less
row with its biomarkers and PNG paths under the same keyed integrity, next to a screening of the same photo.
Photographs: HRF 06_g (Budai et al. 2013, CC BY 4.0, tests/data/open-fundus/PROVENANCE-vessels.md) and the CC0
images of tests/data/fundus."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_field_watch_formats import _photo, dicom_photo
from test_segmentation import CALIB, VAL

from fundus_edge.cli import main
from fundus_edge.runtime.field.store import ResultStore

PATIENT = "MRN-FILE-314"


@pytest.fixture(scope="module")
def seg_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped reference vessel U-Net built into a segmentation bundle, as tests/test_segmentation.py does."""
    from fundus_edge.datasets.masks import write_masks_csv
    from fundus_edge.pipeline.build import BuildConfig, run_build

    root = tmp_path_factory.mktemp("seg")
    calib = root / "calib"
    calib.mkdir()
    for p in CALIB:
        shutil.copy(p, calib / p.name)
    cfg = BuildConfig(model="reference:vessels-unet", out=root / "bundle", calib=calib,
                      val=write_masks_csv(root / "val.csv", VAL), task="auto", threads=2, allow_failed_gate=True)
    run_build(cfg, log=lambda s: None)
    return root / "bundle"


def test_dicom_study_and_laterality_stored_and_patient_name_never_shown(built: Any, tmp_path: Path,
                                                                         real_photos: list[Path],
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    dcm, db = tmp_path / "eye.dcm", tmp_path / "r.db"
    dcm.write_bytes(dicom_photo(_photo(real_photos[0], 400), laterality="R", name="Doe^Jane"))
    pid = tmp_path / "pid"
    pid.write_text(PATIENT + "\n")
    shown = []
    for extra in (["--json"], [], ["--jsonl"]):  # the first screens it, the next two find it in the store
        code = main(["screen", "--bundle", str(built.out), "--store", str(db), "--patient-id-file", str(pid),
                     str(dcm), *extra])
        out = capsys.readouterr()
        shown.append(out.out + out.err)
        assert code == 0, out
    doc = json.loads(shown[0])["results"][0]
    assert (doc["study_instance_uid"], doc["laterality"], doc["task"]) == ("1.2.826.0.1.3680043.8.498.77", "R",
                                                                          "classification")
    assert "[stored result #1" in shown[1] and json.loads(shown[2].splitlines()[0])["result"]["stored"]
    with ResultStore(db) as s:
        rows = list(s.rows())
    assert len(rows) == 1 and (rows[0].eye, rows[0].patient_id) == ("right", PATIENT)  # eye from the laterality
    # --eye given and the file says otherwise: the given eye is kept (its own row) and the mismatch is shown
    assert main(["screen", "--bundle", str(built.out), "--store", str(db), "--patient-id-file", str(pid),
                 "--eye", "left", str(dcm)]) == 0
    out = capsys.readouterr()
    shown.append(out.out + out.err)
    assert "laterality in the DICOM file" in out.out
    export = tmp_path / "export.csv"
    assert main(["results", "export", "--store", str(db), "--out", str(export)]) == 0
    shown.append(capsys.readouterr().err)
    table = export.read_text()
    assert "1.2.826.0.1.3680043.8.498.77" in table and ",R," in table
    everything = "\n".join(shown) + table + (tmp_path / "r.audit.jsonl").read_text()
    for secret in ("Doe", "Jane", "19600101", "MRN-DICOM-1"):  # demographics of the file: never anywhere
        assert secret not in everything, secret
    assert PATIENT not in "\n".join(shown) + (tmp_path / "r.audit.jsonl").read_text()  # only in the export


def test_segmentation_rows_in_the_store_with_biomarkers_and_integrity(built: Any, seg_bundle: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    photo, db, masks = VAL[0].image, tmp_path / "r.db", tmp_path / "vessels"
    pid = tmp_path / "pid"
    pid.write_text(PATIENT)
    base = ["--store", str(db), "--patient-id-file", str(pid), "--eye", "OD", str(photo)]
    assert main(["screen", "--bundle", str(seg_bundle), *base, "--out-dir", str(masks), "--jsonl"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    first = lines[0]["result"]
    assert first["task"] == "segmentation" and first["decision"] == "segmented" and first["probability"] is None
    b = first["biomarkers"]
    assert 0.03 < b["density"] < 0.2 and 1.2 < b["fractal_dimension"] < 1.8  # as test_segmentation measures
    assert Path(first["mask_path"]).parent == masks and Path(first["overlay_path"]).is_file()
    assert Path(first["mask_path"]).name.startswith("06_g.") and lines[-1]["summary"]["segmented"] == 1
    # the same photo again: from the store; and a DR screening of it: its own row in the same store
    assert main(["screen", "--bundle", str(seg_bundle), *base, "--out-dir", str(masks)]) == 0
    again = capsys.readouterr().out
    assert "SEGMENTED vessel density" in again and "[stored result #1" in again
    assert main(["screen", "--bundle", str(built.out), *base]) == 0
    capsys.readouterr()
    with ResultStore(db) as s:
        rows = list(s.rows())
    assert [r.task for r in rows] == ["segmentation", "classification"]
    assert rows[0].biomarkers == b and rows[1].biomarkers is None and rows[1].probability is not None
    assert main(["results", "verify", "--store", str(db), "--json"]) == 0  # row macs cover the new columns
    assert json.loads(capsys.readouterr().out)["keyed"]["problems"] == []
    assert main(["results", "export", "--store", str(db), "--format", "jsonl"]) == 0
    exported = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert exported[0]["biomarkers"] == b and exported[0]["mask_path"] == first["mask_path"]
    assert exported[0]["patient_id"] == PATIENT and exported[0]["eye"] == "right"
