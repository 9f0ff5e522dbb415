"""The demo's segmentation part: the reference vessel U-Net built into a segmentation bundle on real photos with
expert vessel masks (HRF, Budai et al. 2013; CHASE_DB1, Fraz et al. 2012; both CC BY 4.0), calibrated on
training-split photos, gated on test-split photos the model never saw, then overlays of a few HRF test photos
screened by the device runtime. Needs the [export] extra (torch) for the build."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

N_VAL_HRF = 4  # test-split HRF photos the gate runs on (full 3504 x 2336 photos)
N_VAL_CHASE = 2  # ... and CHASE_DB1 photos
N_CALIB = 6  # training-split photos whose tiles calibrate int8
N_OVERLAYS = 3


def _splits(meta: dict[str, Any]) -> dict[str, list[str]]:
    return dict(meta.get("training", {}).get("splits", {}))


def segmentation_demo(out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Build the vessel bundle into ``out/vessels-bundle`` and write overlays into ``out/vessels-overlays``;
    returns what the demo reports (gate numbers, bundle path, overlay paths, biomarkers)."""
    from ..datasets.masks import MaskedImage, write_masks_csv
    from ..datasets.open_fundus import chase_db1, find_root, hrf
    from ..export.load import load_model
    from ..pipeline.build import BuildConfig, run_build
    from ..runtime.segment import load_segmenter

    root = find_root()
    splits = _splits(load_model("reference:vessels-unet").meta)
    photos = [p for p in hrf(root) + chase_db1(root) if p.vessels is not None]
    test = set(splits.get("test-hrf", [])) | set(splits.get("test-chase_db1", []))
    train = set(splits.get("train", []))
    val_hrf = [p for p in photos if p.dataset == "hrf" and p.path.stem in test][:N_VAL_HRF]
    val_chase = [p for p in photos if p.dataset == "chase_db1" and p.path.stem in test][:N_VAL_CHASE]
    val = [MaskedImage(p.path, p.vessels, p.fov) for p in val_hrf + val_chase if p.vessels is not None]
    calib_photos = [p.path for p in photos if p.path.stem in train][:: max(1, len(train) // N_CALIB)][:N_CALIB]
    work = out / "vessels-work"
    shutil.rmtree(work, ignore_errors=True)
    (work / "calib").mkdir(parents=True)
    for c in calib_photos:
        (work / "calib" / c.name).symlink_to(c.resolve())
    csv = write_masks_csv(work / "val.csv", val)
    log(f"vessel segmentation: building on {len(val)} test-split photos ({len(val_hrf)} HRF, {len(val_chase)} "
        f"CHASE_DB1), calibrating on {len(calib_photos)} training-split photos")
    cfg = BuildConfig(model="reference:vessels-unet", out=out / "vessels-bundle", calib=work / "calib", val=csv,
                      task="segmentation", formats=("onnx", "tflite"), allow_failed_gate=True, force=True, threads=0)
    result = run_build(cfg, log=log)
    overlays = []
    with load_segmenter(result.out or cfg.out) as seg:
        for p in val_hrf[:N_OVERLAYS]:
            r = seg.segment(p.path, out / "vessels-overlays")
            overlays.append({"photo": str(p.path), "diagnosis": p.diagnosis, "mask": r.mask, "overlay": r.overlay,
                             "biomarkers": r.biomarkers, "artifact": r.artifact})
            if r.biomarkers:
                log(f"  {p.path.name} ({p.diagnosis}): vessel density {r.biomarkers['density']:.3f}, fractal "
                    f"dimension {r.biomarkers['fractal_dimension']:.3f} -> {r.overlay}")
    rep = result.report
    return {"bundle": str(result.out), "gate_passed": result.gate_passed, "reference": rep["reference"],
            "gates": [{k: g[k] for k in ("artifact", "passed", "ships", "auc", "f1", "delta_auc", "delta_f1",
                                         "min_mask_dice")} for g in rep["gates"]],
            "threshold": rep["operating_point"]["threshold"], "validation_photos": [str(v.image) for v in val],
            "overlays": overlays,
            "credit": "HRF (Budai et al. 2013) and CHASE_DB1 (Fraz et al. 2012) expert vessel masks, CC BY 4.0"}
