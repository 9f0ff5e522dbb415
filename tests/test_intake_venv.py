"""The must-show of bringing your own ONNX: in a fresh venv holding only ``fundus-edge[quantize]`` (onnx,
onnxruntime, sympy, matplotlib; no torch), ``fundus-edge build --model model.onnx`` writes a gated, verified
bundle that the same venv screens with. Likewise a float .tflite with only ``fundus-edge[quantize-tflite]``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from device_venv import install_extra, run_cli
from intake_files import reference_onnx, reference_tflite, small_sets

from fundus_edge.bundle.read import sha256_file

ALLOWED = {"PASS", "INSUFFICIENT EVIDENCE"}  # 48 validation images cannot show the margins (docs/gate.md)


@pytest.fixture(scope="module")
def quantize_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_extra(tmp_path_factory.mktemp("quantize-venv"), "quantize")


def test_quantize_venv_has_no_torch(quantize_venv: Path) -> None:
    code = ("import importlib.util as u, json;"
            "print(json.dumps({m: u.find_spec(m) is not None for m in "
            "['torch', 'torchvision', 'onnxscript', 'litert_torch', 'onnx', 'onnxruntime', 'sympy']}))")
    py = quantize_venv / "bin" / "python"
    found = json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout)
    assert found == {"torch": False, "torchvision": False, "onnxscript": False, "litert_torch": False,
                     "onnx": True, "onnxruntime": True, "sympy": True}
    r = subprocess.run([str(py), "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr


def test_build_from_onnx_in_a_torch_free_venv(quantize_venv: Path, tmp_path: Path,
                                              real_photos: list[Path]) -> None:
    model = reference_onnx(tmp_path / "model.onnx")  # made here, with torch; the venv has none
    val, calib = small_sets(tmp_path / "data")
    out = tmp_path / "bundle"
    r = run_cli(quantize_venv, "build", "--model", str(model), "--calib", str(calib), "--val", str(val),
                "--out", str(out), "--allow-insufficient-evidence", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert doc["verdict"] in ALLOWED and [g["artifact"] for g in doc["gates"]] == ["onnx-int8"]
    info = run_cli(quantize_venv, "info", "--bundle", str(out))
    assert info.returncode == 0 and "files verified" in info.stdout, info.stdout + info.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["source_format"] == "onnx" and m["model"]["source_sha256"] == sha256_file(model)
    assert m["default_artifact"] == "onnx-int8" and "torch" not in m["producer"]
    assert (out / "report.html").is_file()  # the same report, figures included
    s = run_cli(quantize_venv, "screen", "--bundle", str(out), str(real_photos[0]), "--json")
    assert s.returncode == 0, s.stderr
    assert json.loads(s.stdout)["results"][0]["decision"] in ("refer", "no-refer")


def test_build_from_tflite_in_a_torch_free_venv(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    env = install_extra(tmp_path_factory.mktemp("quantize-tflite-venv"), "quantize-tflite")
    py = env / "bin" / "python"
    code = ("import importlib.util as u, json; print(json.dumps({m: u.find_spec(m) is not None for m in "
            "['torch', 'litert_torch', 'onnx', 'litert_quantizer', 'ai_edge_litert']}))")
    found = json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout)
    assert found == {"torch": False, "litert_torch": False, "onnx": False, "litert_quantizer": True,
                     "ai_edge_litert": True}
    model = reference_tflite(tmp_path / "model.tflite")  # made here, with torch and litert-torch
    val, calib = small_sets(tmp_path / "data")
    out = tmp_path / "bundle"
    r = run_cli(env, "build", "--model", str(model), "--calib", str(calib), "--val", str(val), "--out", str(out),
                "--allow-insufficient-evidence", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["verdict"] in ALLOWED
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["source_format"] == "tflite" and m["model"]["source_sha256"] == sha256_file(model)
    assert m["default_artifact"] == "tflite-int8" and m["quantization"]["tflite-int8"]["full_integer"]
    info = run_cli(env, "info", "--bundle", str(out))
    assert info.returncode == 0 and "files verified" in info.stdout, info.stdout + info.stderr
