"""A LiteRT-only device install: `fundus-edge[litert]` (ai-edge-litert, no torch, no onnxruntime) screens,
checks and produces parity outputs from a toolchain bundle's TFLite artifacts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from device_venv import build_wheel, install_wheel_extra, run_cli


@pytest.fixture(scope="module")
def litert_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """From the wheel the project builds (`make wheel`); the onnx venv of test_runtime_venv installs the checkout."""
    wheel = build_wheel(tmp_path_factory.mktemp("wheel"))
    return install_wheel_extra(tmp_path_factory.mktemp("litert-venv"), wheel, "litert")


def test_litert_venv_has_neither_torch_nor_onnxruntime(litert_venv: Path) -> None:
    code = ("import importlib.util as u, json;"
            "print(json.dumps({m: u.find_spec(m) is not None for m in ['torch', 'onnx', 'onnxruntime', "
            "'litert_torch', 'ai_edge_quantizer', 'tflite_runtime', 'tensorflow', 'ai_edge_litert']}))")
    r = subprocess.run([str(litert_venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(r.stdout) == {"torch": False, "onnx": False, "onnxruntime": False, "litert_torch": False,
                                    "ai_edge_quantizer": False, "tflite_runtime": False, "tensorflow": False,
                                    "ai_edge_litert": True}


def test_litert_venv_screens_like_the_toolchain(litert_venv: Path, built: Any, real_photos: list[Path]) -> None:
    r = run_cli(litert_venv, "screen", "--bundle", str(built.out), "--backend", "litert",
             *map(str, real_photos[:2]), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["backend"] == "litert" and doc["artifact"] == "tflite-int8" and doc["summary"]["errors"] == 0
    from fundus_edge.runtime import load

    with load(built.out, artifact="tflite-int8") as s:
        here = [s.screen(str(p)).probability for p in real_photos[:2]]
    assert [res["probability"] for res in doc["results"]] == pytest.approx(here, abs=1e-6)
    # the ONNX artifacts cannot run here: a clear error, not a crash
    r2 = run_cli(litert_venv, "screen", "--bundle", str(built.out), "--backend", "onnxruntime", str(real_photos[0]))
    assert r2.returncode == 3 and "pip install 'fundus-edge[onnx]'" in r2.stderr


def test_litert_venv_chooses_what_it_can_run(litert_venv: Path, built: Any, real_photos: list[Path]) -> None:
    """No --backend: the default artifact (onnx-int8) cannot run here, so screen runs tflite-int8 and says so;
    doctor's "it will run tflite/int8" holds for `screen --device auto`, and bench measures the TFLite files."""
    r = run_cli(litert_venv, "screen", "--bundle", str(built.out), str(real_photos[0]), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["artifact"] == "tflite-int8"
    r = run_cli(litert_venv, "doctor", "--device", "generic-aarch64", "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == 0 and doc["system"]["runtime_formats"] == ["tflite"], r.stdout + r.stderr
    assert any("it will run tflite/int8" in a for a in doc["advice"])
    r = run_cli(litert_venv, "screen", "--device", "generic-aarch64", "--bundle", str(built.out),
                str(real_photos[0]), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["artifact"] == "tflite-int8", r.stderr
    r = run_cli(litert_venv, "bench", "--bundle", str(built.out), str(real_photos[0]), "--repeats", "1",
                "--no-cold-start", "--project")
    assert r.returncode == 0, r.stderr
    assert "onnx-int8 not benchmarked" in r.stdout and "tflite-int8" in r.stdout


def test_litert_venv_check_gates_the_tflite_files(litert_venv: Path, built: Any, synth_val: Path) -> None:
    """Without onnxruntime, `check` gates tflite-int8 against tflite-fp32, and computes exactly the gate the
    toolchain computes from the build's own scores of those two files (whatever its verdict)."""
    r = run_cli(litert_venv, "check", "--bundle", str(built.out), "--val", str(synth_val), "--json")
    doc = json.loads(r.stdout)
    assert r.returncode == {"PASS": 0, "INSUFFICIENT EVIDENCE": 15, "FAIL": 8}[doc["verdict"]], r.stderr
    assert doc["reference"] == "tflite-fp32" and set(doc["skipped"]) == {"onnx-fp32", "onnx-int8"}
    assert [g["artifact"] for g in doc["gates"]] == ["tflite-int8"]
    from fundus_edge.gate.gate import GateCriteria, gate

    rep = json.loads((built.out / "report.json").read_text())
    m = built.manifest
    expected = gate("tflite-int8", np.array(rep["labels"]), np.array(rep["scores"]["tflite-fp32"]),
                    np.array(rep["scores"]["tflite-int8"]), m["operating_point"]["threshold"],
                    GateCriteria(**m["gate"]["criteria"]), "tflite-fp32")
    got = doc["gates"][0]
    assert (got["flips"], got["passed"], got["verdict"]) == (expected.flips, expected.passed, expected.verdict)
    assert got["delta_auc"] == pytest.approx(expected.delta_auc, abs=1e-9)
    assert doc["evaluations"]["tflite-int8"]["auc"] == pytest.approx(
        next(g["auc"] for g in rep["gates"] if g["artifact"] == "tflite-int8"))
    assert doc["note"] == "onnx-fp32 cannot run in this install; gating against tflite-fp32 instead"


def test_litert_venv_outputs_compare_on_the_workstation(litert_venv: Path, built: Any, real_photos: list[Path],
                                                        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dev = tmp_path / "device.npz"
    r = run_cli(litert_venv, "compare", "--bundle", str(built.out), str(real_photos[0]), "--synthetic", "2",
             "--label", "device", "--save-outputs", str(dev), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert list(doc["runners"]) == ["tflite-fp32", "tflite-int8"]
    assert any("pytorch: not run" in n for n in doc["notes"]) and any("onnx-fp32: not run" in n for n in doc["notes"])
    from fundus_edge.cli import main

    code = main(["compare", "--bundle", str(built.out), str(real_photos[0]), "--synthetic", "2",
                 "--load-outputs", str(dev), "--json"])
    here = json.loads(capsys.readouterr().out)
    assert code == 0
    assert here["merged"] == [{"label": "device", "runners": {"tflite-fp32": "tflite-fp32@device",
                                                              "tflite-int8": "tflite-int8@device"},
                               "n_common": 3, "inputs_differ": 0, "missing": 0}]
    pairs = {(c["reference"], c["candidate"]): c for c in here["matrix"]["checked"]}
    assert pairs[("tflite-int8", "tflite-int8@device")]["max_abs"] == 0.0
    assert pairs[("pytorch", "tflite-fp32@device")]["max_abs"] < 1e-3
    assert np.isfinite([c["max_abs"] for c in here["matrix"]["checked"]]).all()
