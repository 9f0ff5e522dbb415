"""Vessel segmentation end to end: the shipped reference U-Net is built into a segmentation bundle on real photos
with expert masks (HRF 06_g, CHASE_DB1 Image_11L: Budai et al. 2013, Fraz et al. 2012, CC BY 4.0; see
tests/data/open-fundus/PROVENANCE-vessels.md), its gate numbers are checked, the device screens a photo into a mask
and an overlay with biomarkers, peak memory of that is measured against the Pi Zero 2 W, and a model whose output
fits no task is refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fundus_edge.cli.main import main
from fundus_edge.datasets.masks import MaskedImage, write_masks_csv
from fundus_edge.pipeline.build import BuildConfig, run_build

DATA = Path(__file__).parent / "data" / "open-fundus"
HRF = DATA / "hrf"
VAL = [MaskedImage(HRF / "images" / "06_g.jpg", HRF / "vessels" / "06_g.png", HRF / "fov" / "06_g.png"),
       MaskedImage(DATA / "chase_db1" / "images" / "Image_11L.jpg",
                   DATA / "chase_db1" / "vessels_1st" / "Image_11L_1stHO.png")]
CALIB = [HRF / "images" / "01_h.jpg", DATA / "chase_db1" / "images" / "Image_04R.jpg"]  # training-split photos


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("seg")
    calib = root / "calib"
    calib.mkdir()
    for p in CALIB:
        shutil.copy(p, calib / p.name)
    val = write_masks_csv(root / "val.csv", VAL)
    cfg = BuildConfig(model="reference:vessels-unet", out=root / "bundle", calib=calib, val=val, task="auto",
                      threads=2, allow_failed_gate=True, formats=("onnx",))  # TFLite: test_segmentation_commands
    result = run_build(cfg, log=lambda s: None)
    return root / "bundle", val, result.report


def test_build_and_gate_numbers(built: tuple[Path, Path, dict]) -> None:
    bundle, _, report = built
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["task"] == "segmentation"
    assert manifest["output"]["meaning"]["kind"] == "pixel-logits"
    assert manifest["dense"]["tile"] == 384 and manifest["input"]["shape"][1] == 1
    assert {a["id"] for a in manifest["artifacts"]} == {"onnx-fp32", "onnx-int8"}
    assert (bundle / "report.md").read_text().count("Segmentation gate") == 1
    ref = report["reference"]
    # the model card measures pooled test AUC 0.907-0.926 and F1 0.66 on these sets
    assert ref["auc"] > 0.88 and ref["f1"] > 0.6
    assert report["export"]["onnx-fp32"]["parity"]["other-size"]["max_abs_diff"] < 1e-3
    gates = {g["artifact"]: g for g in report["gates"]}
    int8 = gates["onnx-int8"]
    # the gate's own verdict agrees with its criteria and numbers
    crit = report["segmentation_gate"]["criteria"]
    assert int8["passed"] == (int8["delta_auc"] >= crit["min_delta_auc"] and int8["delta_f1"] >= crit["min_delta_f1"]
                              and int8["min_mask_dice"] >= crit["min_mask_dice"])
    assert manifest["gate"]["passed"] == int8["passed"]
    # int8 stays close to fp32 even where the strict gate fails: pixel AUC within 0.02, masks overlap >= 0.85
    assert int8["delta_auc"] > -0.02 and int8["min_mask_dice"] > 0.85
    assert len(int8["delta_density"]) == 2 and max(map(abs, int8["delta_density"])) < 0.02


def test_screen_writes_mask_overlay_and_biomarkers(built: tuple[Path, Path, dict], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bundle = built[0]
    photo = VAL[0].image
    assert main(["screen", "--bundle", str(bundle), str(photo), "--out-dir", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    r = out["results"][0]
    assert r["decision"] == "segmented"
    with Image.open(r["mask"]) as m, Image.open(photo) as im, Image.open(r["overlay"]) as ov, \
            Image.open(VAL[0].mask) as g:
        mask = np.asarray(m)
        assert mask.shape == (im.height, im.width) and ov.size == (im.width, im.height)
        gt = np.asarray(g.convert("L")) > 127
    got = mask > 127
    assert 2 * (got & gt).sum() / (got.sum() + gt.sum()) > 0.6  # Dice of the shipped mask vs the expert's
    b = r["biomarkers"]
    assert 0.03 < b["density"] < 0.2 and 1.2 < b["fractal_dimension"] < 1.8
    assert main(["info", "--bundle", str(bundle)]) == 0
    assert "task segmentation" in capsys.readouterr().out


def test_check_regates(built: tuple[Path, Path, dict],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    bundle, val, report = built
    code = main(["check", "--bundle", str(bundle), "--val", str(val), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == (0 if report["gate_passed"] else 8)
    assert out["artifacts"]["onnx-fp32"]["auc"] == pytest.approx(report["reference"]["auc"], abs=1e-9)
    # bench, compare, emulate and package take segmentation bundles: tests/test_segmentation_commands.py


class _NoTask(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)[:, :5, :7]  # [N, 5, 7]: neither class logits nor a per-pixel map


def test_output_fitting_no_task_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "notask.pt"
    torch.jit.script(_NoTask()).save(str(model))
    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy(CALIB[0], calib / CALIB[0].name)
    val = write_masks_csv(tmp_path / "val.csv", VAL[:1])
    code = main(["build", "--model", str(model), "--calib", str(calib), "--val", str(val), "--out",
                 str(tmp_path / "b"), "--task", "auto"])
    err = capsys.readouterr().err
    assert code == 5 and "fits no task" in err and "Traceback" not in err


RSS_SCRIPT = """
import sys
from fundus_edge.runtime.segment import load_segmenter
seg = load_segmenter(sys.argv[1], precision=sys.argv[3])
r = seg.segment(sys.argv[2], None)
assert r.decision == "segmented", r
print([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="VmHWM needs Linux /proc")
def test_peak_memory_against_pi_zero(built: tuple[Path, Path, dict]) -> None:
    from fundus_edge.devices.profile import get_profile

    budget_mb = get_profile("rpi-zero-2w").memory.budget_mb()
    photo = VAL[0].image  # 1752 x 1168
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    peaks = {}
    for precision in ("fp32", "int8"):
        out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(built[0]), str(photo), precision],
                             capture_output=True, text=True, env=env, check=True)
        peaks[precision] = int(out.stdout.strip().splitlines()[-1]) / 1024
    print(f"peak RSS screening a 1752x1168 photo: {peaks} MB; rpi-zero-2w budget {budget_mb} MB")
    assert max(peaks.values()) < budget_mb
