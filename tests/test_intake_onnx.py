"""Bring your own fp32 ONNX or float TFLite file: ``build --model model.onnx|.tflite`` quantizes, gates and
bundles it without importing torch (each build runs in a fresh process where ``import torch`` fails); an
already-quantized file, a model that is not a classifier and other misfits are refused with typed errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from intake_files import reference_onnx, reference_tflite, run_without_torch, small_sets, tiny_onnx

from fundus_edge.bundle.read import load_bundle, sha256_file
from fundus_edge.cli.main import main
from fundus_edge.errors import ModelLoadError, QuantizedReferenceError
from fundus_edge.export.onnx_file import inspect_onnx, probe_onnx

ALLOWED = {"PASS", "INSUFFICIENT EVIDENCE"}  # 48 validation images cannot show the margins (docs/gate.md)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return small_sets(tmp_path_factory.mktemp("intake-sets"))


@pytest.fixture(scope="module")
def onnx_build(tmp_path_factory: pytest.TempPathFactory, sets: tuple[Path, Path]) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("intake-onnx")
    model = reference_onnx(root / "team-model.onnx")
    val, calib = sets
    out = root / "bundle"
    r, loaded = run_without_torch("build", "--model", str(model), "--calib", str(calib), "--val", str(val),
                                  "--out", str(out), "--allow-insufficient-evidence", "--json")
    return {"model": model, "out": out, "result": r, "loaded": loaded}


def test_build_from_onnx_without_torch(onnx_build: dict[str, Any], real_photos: list[Path]) -> None:
    r = onnx_build["result"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert onnx_build["loaded"] == [], f"torch-side modules imported: {onnx_build['loaded']}"
    doc = json.loads(r.stdout)
    assert doc["verdict"] in ALLOWED and doc["gates"][0]["artifact"] == "onnx-int8"
    bundle = load_bundle(onnx_build["out"])  # every checksum verified
    m = bundle.manifest
    source_sha = sha256_file(onnx_build["model"])
    assert m["model"]["source_format"] == "onnx" and m["model"]["source_sha256"] == source_sha
    fp32 = next(a for a in m["artifacts"] if a["id"] == "onnx-fp32")
    assert fp32["sha256"] == source_sha  # the brought file ships unchanged as the reference
    assert m["operating_point"]["locked_on"] == "onnx-fp32" and m["default_artifact"] == "onnx-int8"
    assert m["input"]["name"] == "input" and m["input"]["layout"] == "NCHW" and m["preprocessing"]["size"] == 224
    parity = m["export"]["onnx-fp32"]
    assert parity["reference"] == "source file" and parity["max_abs"] == 0.0 and parity["n"] > 0
    q = m["quantization"]["onnx-int8"]
    assert q["int8_mac_fraction"] > 0.9
    report = json.loads((onnx_build["out"] / "report.json").read_text())
    assert report["model"] == {"source": str(onnx_build["model"]), "source_format": "onnx",
                               "source_sha256": source_sha}
    assert "the brought model file" in (onnx_build["out"] / "report.md").read_text()
    from fundus_edge.runtime import load

    with load(onnx_build["out"]) as s:
        res = s.screen(str(real_photos[0]))
    assert res.decision in ("refer", "no-refer") and res.probability is not None and 0.0 <= res.probability <= 1.0


def test_already_quantized_onnx_is_refused(onnx_build: dict[str, Any], sets: tuple[Path, Path],
                                           tmp_path: Path) -> None:
    int8 = tmp_path / "quantized.onnx"
    shutil.copyfile(onnx_build["out"] / "model.int8.onnx", int8)
    val, calib = sets
    r, loaded = run_without_torch("build", "--model", str(int8), "--calib", str(calib), "--val", str(val),
                                  "--out", str(tmp_path / "b"))
    assert r.returncode == 5, r.stderr
    assert "already quantized" in r.stderr and "QuantizeLinear" in r.stderr and "Traceback" not in r.stderr
    assert loaded == [] and not (tmp_path / "b").exists()
    with pytest.raises(QuantizedReferenceError, match="integer weight"):
        inspect_onnx(tiny_onnx(tmp_path / "w8.onnx", int8_weights=True))


def test_four_d_output_onnx_is_refused(sets: tuple[Path, Path], tmp_path: Path, capsys: Any) -> None:
    dense = tiny_onnx(tmp_path / "vessels.onnx", dense_output=True)
    val, calib = sets
    rc = main(["build", "--model", str(dense), "--calib", str(calib), "--val", str(val), "--out",
               str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 5, err
    assert "[1, 2, 32, 32]" in err and "classifiers only" in err and "Traceback" not in err


def test_onnx_input_is_read_from_the_file(tmp_path: Path) -> None:
    nhwc = inspect_onnx(tiny_onnx(tmp_path / "nhwc.onnx", layout="NHWC", batch=1))
    assert (nhwc.layout, nhwc.size, nhwc.fixed_batch, nhwc.input_name) == ("NHWC", 32, 1, "x")
    assert probe_onnx(nhwc, 32).shape == (1, 2)
    dyn = inspect_onnx(tiny_onnx(tmp_path / "dyn.onnx", side="S"))
    assert (dyn.layout, dyn.size, dyn.fixed_batch) == ("NCHW", None, None)
    assert probe_onnx(dyn, 64).num_outputs == 2
    with pytest.raises(ModelLoadError, match="fixed batch of 4"):
        inspect_onnx(tiny_onnx(tmp_path / "b4.onnx", batch=4))


def test_onnx_flags_that_do_not_fit_the_file(sets: tuple[Path, Path], tmp_path: Path, capsys: Any) -> None:
    model = tiny_onnx(tmp_path / "m.onnx")
    val, calib = sets
    base = ["build", "--model", str(model), "--calib", str(calib), "--val", str(val), "--out", str(tmp_path / "b")]
    assert main([*base, "--formats", "onnx,tflite"]) == 2
    assert "builds onnx artifacts only" in capsys.readouterr().err
    assert main([*base, "--input-size", "64"]) == 2
    assert "takes 32 x 32 images" in capsys.readouterr().err
    assert main([*base, "--task", "segmentation"]) == 2
    assert not (tmp_path / "b").exists()


def test_build_from_tflite_without_torch(sets: tuple[Path, Path], tmp_path: Path) -> None:
    model = reference_tflite(tmp_path / "team-model.tflite")
    val, calib = sets
    out = tmp_path / "bundle"
    r, loaded = run_without_torch("build", "--model", str(model), "--calib", str(calib), "--val", str(val),
                                  "--out", str(out), "--allow-insufficient-evidence", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    assert loaded == [], f"torch-side modules imported: {loaded}"
    assert json.loads(r.stdout)["verdict"] in ALLOWED
    m = load_bundle(out).manifest
    assert m["model"]["source_format"] == "tflite" and m["model"]["source_sha256"] == sha256_file(model)
    assert [a["id"] for a in m["artifacts"]] == ["tflite-fp32", "tflite-int8"]
    assert m["operating_point"]["locked_on"] == "tflite-fp32" and m["input"]["layout"] == "NHWC"
    q = m["quantization"]["tflite-int8"]
    assert q["full_integer"] and q["io_dtype"]["input"] == "int8"
    # the int8 file the build wrote cannot be brought back as a reference
    r2, _ = run_without_torch("build", "--model", str(out / "model.int8.tflite"), "--calib", str(calib), "--val",
                              str(val), "--out", str(tmp_path / "b2"))
    assert r2.returncode == 5 and "already quantized" in r2.stderr and "Traceback" not in r2.stderr


def test_dynamic_size_nhwc_onnx_builds_at_the_input_size_flag(sets: tuple[Path, Path], tmp_path: Path) -> None:
    """A file with a dynamic height and width takes --input-size; its layout (NHWC) and input name come from the
    file, and its MACs are counted at that size (one 1x1 Conv, 3 -> 2 channels: 2 * 3 * 64 * 64)."""
    model = tiny_onnx(tmp_path / "dyn.onnx", layout="NHWC", side="S")
    val, calib = sets
    out = tmp_path / "b"
    assert main(["build", "--model", str(model), "--calib", str(calib), "--val", str(val), "--out", str(out),
                 "--input-size", "64", "--precisions", "fp32", "--mean", "0.5", "0.5", "0.5"]) == 0
    m = load_bundle(out).manifest
    assert m["input"] == {"name": "x", "shape": ["batch", 64, 64, 3], "dtype": "float32", "layout": "NHWC"}
    assert m["preprocessing"]["size"] == 64 and m["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert m["compute"]["macs"] == 2 * 3 * 64 * 64 and m["compute"]["uncounted"] == []
    assert [a["id"] for a in m["artifacts"]] == ["onnx-fp32"]
