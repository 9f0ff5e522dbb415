"""The device install is torch-free: a fresh venv with only `fundus-edge[onnx]` screens a toolchain bundle."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from device_venv import install_extra, run_cli


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_extra(tmp_path_factory.mktemp("runtime-venv"), "onnx")


def test_runtime_venv_has_no_toolchain(runtime_venv: Path) -> None:
    py = runtime_venv / "bin" / "python"
    code = ("import importlib.util as u, json;"
            "print(json.dumps({m: u.find_spec(m) is not None for m in "
            "['torch', 'torchvision', 'onnx', 'onnxscript', 'onnxruntime', 'numpy', 'PIL']}))")
    found = json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True, check=True).stdout)
    assert found == {"torch": False, "torchvision": False, "onnx": False, "onnxscript": False,
                     "onnxruntime": True, "numpy": True, "PIL": True}


def test_runtime_venv_screens_a_toolchain_bundle(runtime_venv: Path, built: Any, real_photos: list[Path]) -> None:
    r = run_cli(runtime_venv, "screen", "--bundle", str(built.out), *map(str, real_photos[:2]), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["summary"] == {"n": 2, "refer": doc["summary"]["refer"], "no_refer": doc["summary"]["no_refer"],
                              "ungradable": 0, "errors": 0}
    assert doc["artifact"] == "onnx-int8"
    # same numbers as in the toolchain environment
    from fundus_edge.runtime import load

    with load(built.out) as s:
        here = s.screen(str(real_photos[0])).probability
    assert doc["results"][0]["probability"] == pytest.approx(here, abs=1e-6)


def test_runtime_venv_check_and_import_guard(runtime_venv: Path, built: Any, synth_val: Path) -> None:
    r = run_cli(runtime_venv, "check", "--bundle", str(built.out), "--val", str(synth_val))
    verdict = built.manifest["gate"]["verdict"]  # the build's images: the build's verdict (docs/gate.md)
    assert r.returncode == {"PASS": 0, "INSUFFICIENT EVIDENCE": 15}[verdict], r.stderr
    assert f"check: {verdict}" in r.stdout and "operating point onnx-fp32" in r.stdout
    py = runtime_venv / "bin" / "python"
    # every module of the device-side packages (and the CLI, check, quality calibration) imports without torch
    code = ("import importlib, pkgutil, sys, fundus_edge;"
            "pkgs = ('runtime', 'devices', 'bundle', 'gate', 'cli');"
            "mods = [m.name for p in pkgs for m in pkgutil.walk_packages("
            "importlib.import_module('fundus_edge.' + p).__path__, 'fundus_edge.' + p + '.')];"
            "[importlib.import_module(m) for m in mods + ['fundus_edge.pipeline.check']];"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'torchvision', 'litert_torch')];"
            "print(len(mods), bad); sys.exit(1 if bad or len(mods) < 40 else 0)")
    assert subprocess.run([str(py), "-c", code], capture_output=True, text=True).returncode == 0
    r3 = run_cli(runtime_venv, "doctor", "--device", "rpi4", "--json")  # profiles ship in the wheel; no torch needed
    assert r3.returncode == 0, r3.stdout + r3.stderr
    assert json.loads(r3.stdout)["profile"] == "rpi4"
    r2 = run_cli(runtime_venv, "build", "--model", "reference:dr-resnet18s", "--calib", "x", "--val", "y.csv",
              "--out", "z")
    assert r2.returncode == 3, r2.stderr
    assert "pip install 'fundus-edge[export]'" in r2.stderr
    # no TFLite runtime in this install: the LiteRT backend fails naming what to install
    r3 = run_cli(runtime_venv, "screen", "--bundle", str(built.out), "--backend", "litert", "x.jpg")
    assert r3.returncode == 3, r3.stderr
    assert "pip install 'fundus-edge[litert]'" in r3.stderr and "tflite-runtime" in r3.stderr


def test_runtime_venv_quality_and_calibration(runtime_venv: Path, real_photos: list[Path], tmp_path: Path) -> None:
    """The image-quality check and the per-camera calibration run with the device install (no torch)."""
    r = run_cli(runtime_venv, "quality", str(real_photos[0].parent), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["summary"]["gradable"] == len(real_photos)
    from PIL import Image, ImageFilter

    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    for i in range(10):  # the real photographs, twice, as 'good'; blurred copies as 'bad'
        img = Image.open(real_photos[i % len(real_photos)]).convert("RGB")
        img.rotate(180 * (i // len(real_photos))).save(good / f"g{i}.jpg", quality=92)
        img.filter(ImageFilter.GaussianBlur(8)).save(bad / f"b{i}.jpg", quality=92)
    out = tmp_path / "spec.json"
    r = run_cli(runtime_venv, "quality", "calibrate", "--good", str(good), "--bad", str(bad), "--out", str(out),
                "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    sharp = next(m for m in doc["measures"] if m["name"] == "sharpness")
    assert sharp["auc"] == 1.0 and doc["calibrated"]["bad_rejected"] == 1.0
    assert json.loads(out.read_text())["measures"]["sharpness"]["min"] is not None


def test_runtime_venv_bench_and_emulate_skip_tflite(runtime_venv: Path, built: Any, real_photos: list[Path]) -> None:
    """An [onnx]-only install benchmarks and emulates the ONNX files and says why the TFLite ones are left out."""
    r = run_cli(runtime_venv, "bench", "--bundle", str(built.out), str(real_photos[0]), "--repeats", "1",
                "--no-cold-start", "--project")
    assert r.returncode == 0, r.stderr
    assert "tflite-int8 not benchmarked" in r.stdout and "fundus-edge[litert]" in r.stdout
    r = run_cli(runtime_venv, "emulate", "--device", "rpi4", "--arch", "native", "--memory-cap", "rlimit",
                "--precision", "int8", "--bundle", str(built.out), str(real_photos[0]), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["artifacts"] == ["onnx-int8"]
    assert any("tflite-int8 skipped" in n for n in doc["notes"])


def test_runtime_venv_build_from_onnx_names_the_quantize_extra(runtime_venv: Path, tmp_path: Path) -> None:
    """A device install cannot quantize a brought ONNX file; the error names the torch-free extra that can."""
    from intake_files import tiny_onnx

    model = tiny_onnx(tmp_path / "m.onnx")
    r = run_cli(runtime_venv, "build", "--model", str(model), "--calib", "x", "--val", "y.csv", "--out", "z")
    assert r.returncode == 3, r.stderr
    assert "pip install 'fundus-edge[quantize]'" in r.stderr and "Traceback" not in r.stderr
