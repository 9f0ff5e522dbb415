"""bench, compare, emulate and package on a segmentation (vessel) bundle. The shipped reference vessel U-Net is
built (ONNX and fixed-tile TFLite, fp32 and int8) at a small working size (FOV 384 px across, 128 px tiles) on real
photos with expert masks (HRF 06_g,
CHASE_DB1 Image_11L: Budai et al. 2013, Fraz et al. 2012, CC BY 4.0; tests/data/open-fundus/PROVENANCE-vessels.md)
so each command runs in seconds; the numbers are checked against what the build's own gate measured."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from fundus_edge.cli.main import main
from fundus_edge.datasets.masks import MaskedImage, write_masks_csv
from fundus_edge.devices.profile import get_profile
from fundus_edge.errors import FundusEdgeError, UsageError
from fundus_edge.pipeline.build import BuildConfig, run_build
from fundus_edge.runtime.dense import DensePreprocessSpec

DATA = Path(__file__).parent / "data" / "open-fundus"
HRF = DATA / "hrf"
VAL = [MaskedImage(HRF / "images" / "06_g.jpg", HRF / "vessels" / "06_g.png", HRF / "fov" / "06_g.png"),
       MaskedImage(DATA / "chase_db1" / "images" / "Image_11L.jpg",
                   DATA / "chase_db1" / "vessels_1st" / "Image_11L_1stHO.png")]
CALIB = [HRF / "images" / "01_h.jpg", DATA / "chase_db1" / "images" / "Image_04R.jpg"]  # training-split photos
PHOTO = str(VAL[0].image)  # 1752 x 1168
SMALL = DensePreprocessSpec(fov_diameter=384, tile=128, overlap=16)
ALL = {"onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8"}


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("seg-small")
    calib = root / "calib"
    calib.mkdir()
    for p in CALIB:
        shutil.copy(p, calib / p.name)
    val = write_masks_csv(root / "val.csv", VAL)
    cfg = BuildConfig(model="reference:vessels-unet", out=root / "bundle", calib=calib, val=val, task="segmentation",
                      threads=2, allow_failed_gate=True, dense=SMALL, formats=("onnx", "tflite"))
    result = run_build(cfg, log=lambda s: None)
    return root / "bundle", val, result.report


def _json(capsys: pytest.CaptureFixture[str]) -> Any:
    return json.loads(capsys.readouterr().out)


def test_compare_agrees_with_the_gate(small: tuple[Path, Path, dict[str, Any]],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    bundle, val, report = small
    code = main(["compare", "--bundle", str(bundle), "--masks", str(val), "--json"])
    doc = _json(capsys)
    gates = {g["artifact"]: g for g in report["gates"]}
    pairs = {p["candidate"]: p for p in doc["pairs"]}
    assert doc["reference"] == "onnx-fp32" and set(pairs) == ALL - {"onnx-fp32"} and doc["with_masks"]
    assert doc["reference_metrics"]["auc"] == pytest.approx(report["reference"]["auc"], abs=1e-12)
    crit = doc["criteria"]
    for aid, pair in pairs.items():
        # the same photos, files, runtime and threshold as the build's gate: the same numbers
        assert pair["mask_dice"] == pytest.approx(gates[aid]["mask_dice"], abs=1e-12), aid
        assert pair["delta_auc"] == pytest.approx(gates[aid]["delta_auc"], abs=1e-12), aid
        assert pair["delta_density"] == pytest.approx(gates[aid]["delta_density"], abs=1e-12), aid
        assert pair["passed"] == (min(pair["mask_dice"]) >= crit["min_mask_dice"]
                                  and pair["delta_auc"] >= crit["min_delta_auc"]
                                  and pair["delta_f1"] >= crit["min_delta_f1"]), aid
    assert code == (0 if all(p["passed"] for p in pairs.values()) else 11)
    # the TFLite fp32 tile model is the ONNX fp32 model; the int8 files are close, not identical
    assert min(pairs["tflite-fp32"]["mask_dice"]) > 0.999 and max(pairs["tflite-fp32"]["max_abs_prob"]) < 1e-3
    for aid in ("onnx-int8", "tflite-int8"):
        assert min(pairs[aid]["mask_dice"]) > 0.9 and 0 < max(pairs[aid]["max_abs_prob"]) < 1, aid
    # photos without masks: Dice and biomarker change only
    assert main(["compare", "--bundle", str(bundle), PHOTO, "--json"]) in (0, 11)
    doc = _json(capsys)
    assert not doc["with_masks"] and doc["pairs"][0]["delta_auc"] is None
    assert doc["pairs"][0]["mask_dice"][0] == pytest.approx(gates[doc["pairs"][0]["candidate"]]["mask_dice"][0],
                                                            abs=1e-12)


def test_identical_artifacts_compare_as_identical(small: tuple[Path, Path, dict[str, Any]]) -> None:
    from fundus_edge.bundle.read import load_bundle
    from fundus_edge.gate.seg_compare import _pair, bundle_criteria
    from fundus_edge.gate.segmentation import evaluate

    b = load_bundle(small[0])
    fp32 = b.path(b.artifact("onnx-fp32"))
    assert b.spec.dense is not None
    evals = evaluate({"a": fp32, "b": fp32}, VAL, b.spec.dense)
    pair = _pair("b", evals["a"], evals["b"], b.operating_point.threshold, bundle_criteria(b), with_masks=True)
    assert pair.mask_dice == [1.0, 1.0] and pair.max_abs_prob == [0.0, 0.0]
    assert pair.delta_auc == 0.0 and pair.delta_density == [0.0, 0.0] and pair.passed


def test_bench_times_a_photo_through_tiling(small: tuple[Path, Path, dict[str, Any]],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--bundle", str(small[0]), PHOTO, "--repeats", "1", "--threads", "1", "--json"]) == 0
    doc = _json(capsys)
    rows = {r["artifact"]: r for r in doc["rows"]}
    assert set(rows) == ALL
    budget = get_profile("rpi-zero-2w").memory.budget_mb()
    for r in rows.values():
        stages = {k: v["p50"] for k, v in r["stages_ms"].items()}
        assert all(stages[s] > 0 for s in ("prepare", "infer", "stitch", "biomarkers", "write"))
        assert r["e2e_ms"]["p50"] >= stages["prepare"] + stages["infer"] and r["throughput_ips"] > 0
        assert 0 < r["peak_rss_mb"] < budget and r["cold_start_s"] > 0
    # 1752 x 1168: the FOV scaled to 384 px across, covered by overlapping 128 px tiles
    assert "1752x1168 px" in doc["tiles"][0] and "tile(s) of 128 px" in doc["tiles"][0]


def test_emulate_capped_run_fits_the_pi_zero(small: tuple[Path, Path, dict[str, Any]],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["emulate", "--device", "rpi-zero-2w", "--bundle", str(small[0]), "--arch", "native", PHOTO,
                 "--json"])
    doc = _json(capsys)
    assert code == 0 and doc["fits_ok"]
    budget = get_profile("rpi-zero-2w").memory.budget_mb()
    assert {f["artifact"] for f in doc["fits"]} == ALL
    assert all(0 < f["peak_rss_mb"] < budget == f["budget_mb"] for f in doc["fits"])
    for aid, run in doc["native"].items():
        r = run["results"][0]
        assert r["decision"] == "segmented" and 0 < r["biomarkers"]["density"] < 0.3, aid
    # the capped child's biomarkers are the ones `screen` gives for the same photo and artifact
    assert main(["screen", "--bundle", str(small[0]), "--artifact", "onnx-int8", PHOTO, "--json",
                 "--out-dir", str(small[0].parent / "screened")]) == 0
    screened = _json(capsys)["results"][0]["biomarkers"]
    capped = doc["native"]["onnx-int8"]["results"][0]["biomarkers"]  # 4 threads there, 1 here
    assert capped["density"] == pytest.approx(screened["density"], abs=1e-3)
    assert capped["fractal_dimension"] == pytest.approx(screened["fractal_dimension"], abs=1e-2)


def test_package_holds_the_bundle_and_its_config_drives_screen(small: tuple[Path, Path, dict[str, Any]],
                                                                tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from fundus_edge.bundle.signing import generate_keypair, load_signing_key, sign_bundle
    from fundus_edge.devices.config import read_device_table

    bundle = small[0]
    keys = generate_keypair(tmp_path / "keys", "clinic")
    pub = tmp_path / "pub"
    pub.mkdir()
    shutil.copy2(keys.public, pub / keys.public.name)
    out = tmp_path / "pkg"
    assert main(["package", "--device", "rpi-zero-2w", "--bundle", str(bundle), "--out", str(out),
                 "--trusted-keys", str(pub), "--no-tarball", "--json"]) == 0
    pkg = _json(capsys)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for rel in ("manifest.json", *(a["path"] for a in manifest["artifacts"]), "report.md"):
        assert (out / "bundle" / rel).read_bytes() == (bundle / rel).read_bytes(), rel
    names = " ".join(pkg["wheels"])
    assert all(f"{d}-" in names for d in ("numpy", "pillow", "onnxruntime", "fundus_edge"))
    assert "aarch64" in names and "torch" not in names and "opencv" not in names  # runtime only: CLAHE is numpy
    device = read_device_table(out / "device.toml")
    assert device["artifact"] in {a["id"] for a in manifest["artifacts"]}
    sums = (out / "SHA256SUMS").read_text()
    assert "bundle/model.int8.onnx" in sums and "bundle/model.int8.tflite" in sums and "install.sh" in sums
    # the Pi Zero 2 W prefers tflite/int8: the gated tile model, when it passed
    tfl_passed = manifest["gate"]["summary"]["tflite-int8"]["passed"]
    assert (device["artifact"] == "tflite-int8") == tfl_passed
    assert "ai_edge_litert-" in names
    # the packaged screen wrapper's path: --device-config picks the artifact and the trust policy applies
    shot = ["screen", "--device-config", str(out / "device.toml"), PHOTO, "--json", "--out-dir", str(tmp_path / "o")]
    assert main([*shot, "--bundle", str(out / "bundle")]) == 4  # unsigned, signatures required
    capsys.readouterr()
    signed = tmp_path / "signed"
    shutil.copytree(out / "bundle", signed)
    sign_bundle(signed, load_signing_key(keys.private))
    assert main([*shot, "--bundle", str(signed)]) == 0
    doc = _json(capsys)
    assert doc["signature"]["verified"] and doc["artifact"] == device["artifact"]
    assert Path(doc["results"][0]["mask"]).is_file() and doc["results"][0]["decision"] == "segmented"


def test_a_command_without_segmentation_support_refuses(small: tuple[Path, Path, dict[str, Any]]) -> None:
    from fundus_edge.cli.segment import segmentation_command

    with pytest.raises(UsageError, match=r"does not support segmentation bundles.*'bench'"):
        segmentation_command(argparse.Namespace(command="frobnicate", bundle=small[0]))
    assert segmentation_command(argparse.Namespace(command="emulate", bundle=small[0])) is None  # its own handler


@pytest.mark.slow
def test_emulated_arm64_masks_match_x86(small: tuple[Path, Path, dict[str, Any]],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """The int8 files under QEMU (Cortex-A53, the arm64 wheels) against the capped x86 run, one real photo."""
    from fundus_edge.devices.emuroot import setup
    from fundus_edge.devices.parity_seg import MIN_MASK_DICE

    try:
        setup(log=lambda s: print(s, file=sys.stderr))
    except FundusEdgeError as exc:
        pytest.fail(f"the aarch64 emulation root could not be built: {exc}", pytrace=False)
    code = main(["emulate", "--device", "rpi-zero-2w", "--bundle", str(small[0]), "--artifact", "onnx-int8",
                 "--artifact", "tflite-int8", PHOTO, "--json"])
    doc = _json(capsys)
    assert code == 0 and doc["parity_ok"] and doc["emulated"]["machine"] == "aarch64"
    assert {p["artifact"] for p in doc["parity"]} == {"onnx-int8", "tflite-int8"}
    for par in doc["parity"]:
        aid = par["artifact"]
        assert par["n"] == 1 and par["inputs_identical"] == 1, aid  # the arm64 runtime fed the same tiles
        assert MIN_MASK_DICE <= par["min_mask_dice"] <= 1.0 and par["max_abs_prob"] < 0.5, aid
        emu = doc["emulated"]["artifacts"][aid]["results"][0]["biomarkers"]
        nat = doc["native"][aid]["results"][0]["biomarkers"]
        assert abs(emu["density"] - nat["density"]) < 0.002, aid


def test_report_figures_show_the_gates_numbers(small: tuple[Path, Path, dict[str, Any]]) -> None:
    import numpy as np
    from PIL import Image

    bundle, _, _ = small
    report = json.loads((bundle / "report.json").read_text())
    fig = report["figures"]
    gate = report["segmentation_gate"]
    assert fig["mask_dice"] == {g["artifact"]: g["mask_dice"] for g in gate["gates"]}
    for name, pts in fig["roc"].items():
        fpr, tpr = np.asarray(pts["fpr"]), np.asarray(pts["tpr"])
        assert (fpr[0], tpr[0]) == (1.0, 1.0) and (fpr[-1], tpr[-1]) == (0.0, 0.0)
        # the curve's area (200 thresholds of the gate's 65536 bins) is the gate's pixel AUC
        assert float(np.sum((fpr[:-1] - fpr[1:]) * (tpr[:-1] + tpr[1:]) / 2)) == pytest.approx(
            gate["artifacts"][name]["auc"], abs=0.01), name
    md = (bundle / "report.md").read_text()
    manifest = json.loads((bundle / "manifest.json").read_text())
    for rel in ("figures/seg-roc.png", "figures/seg-per-photo.png"):
        assert f"({rel})" in md and rel in manifest["files"]
        with Image.open(bundle / rel) as im:
            assert im.format == "PNG" and im.width > 400


def test_int8_mac_share_counts_pixels_not_weights(small: tuple[Path, Path, dict[str, Any]]) -> None:
    """The ONNX file has dynamic H/W, the TFLite one a fixed tile: the same six convs in float must give the same
    int8 MAC share (a symbolic side counted as 1 pixel would give the share of weights, ~0.9 here)."""
    q = json.loads((small[0] / "manifest.json").read_text())["quantization"]
    onnx_share, tflite_share = q["onnx-int8"]["int8_mac_fraction"], q["tflite-int8"]["int8_mac_fraction"]
    assert len(q["onnx-int8"]["kept_in_float"]) == len(q["tflite-int8"]["kept_in_float"]) == 6
    assert onnx_share == pytest.approx(tflite_share, abs=0.01) and onnx_share < 0.7


def test_check_regates_every_format(small: tuple[Path, Path, dict[str, Any]],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    bundle, val, report = small
    code = main(["check", "--bundle", str(bundle), "--val", str(val), "--json"])
    doc = _json(capsys)
    assert code == (0 if report["gate_passed"] else 8) and doc["skipped"] == []
    built = {g["artifact"]: g for g in report["gates"]}
    for g in doc["gates"]:  # the ONNX and the TFLite files, re-gated through the runtime: the build's numbers
        assert g["auc"] == pytest.approx(built[g["artifact"]]["auc"], abs=1e-12)
        assert g["mask_dice"] == pytest.approx(built[g["artifact"]]["mask_dice"], abs=1e-12)
    assert {g["artifact"] for g in doc["gates"]} == ALL - {"onnx-fp32"}
