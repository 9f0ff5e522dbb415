from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fundus_edge.cli import main


def test_screen_text_and_exit_code(built: Any, real_photos: list[Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "notes.txt.jpg"
    bad.write_text("not an image")
    code = main(["screen", "--bundle", str(built.out), str(real_photos[0]), str(bad)])
    out = capsys.readouterr().out
    assert code == 10  # some images could not be screened; the others were
    assert real_photos[0].name in out and "ERROR" in out and "not-an-image" in out
    assert "1 could not be screened" in out


def test_screen_directory_json(built: Any, real_photos: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["screen", "--bundle", str(built.out), str(real_photos[0].parent), "--json",
                 "--precision", "fp32"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    assert doc["artifact"] == "onnx-fp32" and doc["summary"]["n"] == len(real_photos)
    assert doc["summary"]["errors"] == 0
    assert all(r["ok"] and r["decision"] in ("refer", "no-refer") for r in doc["results"])


def test_tampered_bundle_exit_code_and_json_error(built: Any, tmp_path: Path, real_photos: list[Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    b = tmp_path / "b"
    shutil.copytree(built.out, b)
    p = b / "model.fp32.onnx"
    data = bytearray(p.read_bytes())
    data[100] ^= 0xFF
    p.write_bytes(bytes(data))
    code = main(["screen", "--bundle", str(b), str(real_photos[0]), "--json"])
    captured = capsys.readouterr()
    assert code == 4
    err = json.loads(captured.out)["error"]
    assert err["code"] == "bundle-integrity" and "model.fp32.onnx" in err["message"]
    assert "model.fp32.onnx" in captured.err


def test_check_reruns_the_gate(built: Any, synth_val: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", "--bundle", str(built.out), "--val", str(synth_val), "--json"])
    doc = json.loads(capsys.readouterr().out)
    rep = json.loads((built.out / "report.json").read_text())
    # the same images as the build: the same verdict, and its exit code (0 PASS, 15 INSUFFICIENT EVIDENCE)
    assert doc["verdict"] == rep["verdict"] and doc["passed"] == (doc["verdict"] == "PASS")
    assert code == {"PASS": 0, "INSUFFICIENT EVIDENCE": 15}[doc["verdict"]]
    g = next(g for g in doc["gates"] if g["artifact"] == "onnx-int8")
    assert g["verdict"] == rep["gates"][0]["verdict"] and g["evidence"]["findings"]
    assert [(f["name"], f["verdict"]) for f in g["evidence"]["findings"]] == \
        [(f["name"], f["verdict"]) for f in rep["gates"][0]["evidence"]["findings"]]
    # operating-point drift: its own finding, per artifact, against the targets recorded at build
    drift = {(d["artifact"], d["metric"]): d for d in doc["drift"]}
    ref = drift[("onnx-fp32", "sensitivity")]
    assert ref["target"] == 0.90 and ref["ci"][0] <= ref["estimate"] <= ref["ci"][1] and ref["status"] != "DRIFT"
    assert drift[("onnx-fp32", "specificity")]["target"] == pytest.approx(rep["reference"]["specificity"])
    assert doc["drifted"] is False
    assert doc["evaluations"]["onnx-int8"]["auc"] == pytest.approx(rep["gates"][0]["auc"])


def test_info(built: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--bundle", str(built.out)]) == 0
    out = capsys.readouterr().out
    assert "onnx-int8" in out and "(default)" in out and "verified" in out


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["screen", "--bundle", str(tmp_path), str(tmp_path)]) == 2  # empty dir: no images
    assert main(["build", "--model", "reference:dr-resnet18s", "--calib", str(tmp_path), "--val",
                 str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")]) == 9
    assert "does not exist" in capsys.readouterr().err


def test_console_script_runs() -> None:
    exe = Path(sys.executable).parent / "fundus-edge"
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert r.stdout.startswith("fundus-edge ")
