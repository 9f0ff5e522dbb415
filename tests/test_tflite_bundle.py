"""TFLite artifacts in the reference bundle: manifest, gate, screening with LiteRT, and the parity matrix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fundus_edge.bundle.read import sha256_file
from fundus_edge.cli import main
from fundus_edge.errors import UsageError
from fundus_edge.runtime import load
from fundus_edge.runtime.parity import OutputSet, load_outputs, merge, parity_matrix, save_outputs


def test_bundle_carries_gated_tflite_artifacts(built: Any) -> None:
    m = built.manifest
    arts = {a["id"]: a for a in m["artifacts"]}
    assert set(arts) == {"onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8"}
    assert arts["tflite-fp32"] | {"gate": None, "sha256": None} == {
        "id": "tflite-fp32", "path": "model.fp32.tflite", "format": "tflite", "precision": "fp32", "layout": "NHWC",
        "io_dtype": "float32", "gate": None, "sha256": None}
    assert (arts["tflite-int8"]["layout"], arts["tflite-int8"]["io_dtype"]) == ("NHWC", "int8")
    for a in arts.values():
        assert a["sha256"] == m["files"][a["path"]]["sha256"] == sha256_file(built.out / a["path"])
        assert "passed" in a["gate"]
    for aid in ("tflite-fp32", "tflite-int8"):
        # no harm observed (the fixture's 300 images cannot show the default margins: INSUFFICIENT EVIDENCE, allowed)
        assert m["gate"]["summary"][aid]["verdict"] in ("PASS", "INSUFFICIENT EVIDENCE")
    parity = m["export"]["tflite-fp32"]
    assert parity["passed"] and parity["max_abs"] < 1e-3 and parity["layout"] == "NHWC"
    q = m["quantization"]["tflite-int8"]
    assert q["full_integer"] and q["float_ops"] == {} and q["int8_mac_fraction"] == 1.0
    assert q["config"]["calibration"] == "global-minmax" and q["n_calibration"] == 64
    assert q["quantized_ops"]["CONV_2D"] == 20
    assert m["producer"]["litert-torch"] and m["producer"]["ai-edge-quantizer"]
    md = (built.out / "report.md").read_text()
    assert "tflite-int8" in md and "full-integer" in md


def test_screen_with_litert_gives_the_gated_scores(built: Any, synth_val: Path, real_photos: list[Path],
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["screen", "--bundle", str(built.out), "--backend", "litert", *map(str, real_photos), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["backend"] == "litert" and doc["artifact"] == "tflite-int8"
    assert doc["summary"]["errors"] == 0 and doc["summary"]["n"] == len(real_photos)
    assert main(["screen", "--bundle", str(built.out), "--backend", "litert", "--format", "onnx",
                 str(real_photos[0])]) == 2
    rep = json.loads((built.out / "report.json").read_text())
    from fundus_edge.datasets.labels import read_labels

    paths = read_labels(synth_val).paths[:8]
    for aid in ("tflite-int8", "tflite-fp32"):
        with load(built.out, artifact=aid) as s:  # NHWC input, int8 I/O handled by the screener/backend
            assert s.spec.layout == "NHWC" and s.backend.name == "litert"
            probs = [s.screen(p).probability for p in paths]
        assert np.allclose(probs, rep["scores"][aid][:8], atol=1e-5)


def test_compare_matrix_save_and_load(built: Any, real_photos: list[Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    here = tmp_path / "here.npz"
    code = main(["compare", "--bundle", str(built.out), *map(str, real_photos[:3]), "--synthetic", "4",
                 "--save-outputs", str(here), "--label", "ws", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["n"] == 7 and doc["matrix"]["passed"]
    assert list(doc["runners"]) == ["pytorch", "onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8"]
    checked = {(c["reference"], c["candidate"]): c for c in doc["matrix"]["checked"]}
    assert checked[("pytorch", "tflite-fp32")]["max_abs"] < 1e-3
    assert checked[("tflite-fp32", "tflite-int8")]["decision_agreement"] >= 0.9
    assert doc["int8_coverage"]["tflite-int8"].startswith("full-integer")
    assert len(doc["matrix"]["pairs"]) == 10
    # "another machine": same images, one preprocessed input differs, its int8 logits swap classes
    dev = load_outputs(here)
    dev.meta["label"] = "dev"
    dev.digests[0] = "0" * 64
    dev.outputs["tflite-int8"] = dev.outputs["tflite-int8"][:, ::-1].copy()
    save_outputs(tmp_path / "dev.npz", dev)
    code = main(["compare", "--load-outputs", str(here), str(tmp_path / "dev.npz")])
    out = capsys.readouterr().out
    assert code == 11
    assert "joined dev: 7 common images, 1 with a different preprocessed input" in out
    assert "parity: FAILED" in out and "tflite-int8 vs tflite-int8@dev" in out
    assert "tflite-fp32 vs tflite-fp32@dev" in out  # unchanged: that pair passes
    with pytest.raises(UsageError, match="fundus-edge outputs file"):
        load_outputs(built.out / "report.json")


def test_merge_aligns_images_by_key() -> None:
    a = OutputSet(["x", "y", "z"], ["dx", "dy", "dz"], meta={"label": "a", "positive_classes": [1]})
    a.add("m", np.array([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0]]), precision="fp32", format="tflite")
    b = OutputSet(["z", "x"], ["dz", "other"], meta={"label": "b"})
    b.add("m", np.array([[0.0, 2.0], [0.0, 1.0]]), precision="fp32", format="tflite")
    joined, info = merge(a, b)
    assert joined.keys == ["x", "z"] and info.missing == 1 and info.inputs_differ == 1
    assert np.array_equal(joined.outputs["m"], joined.outputs["m@b"])
    matrix = parity_matrix(joined)
    assert matrix and matrix.checked == [("m", "m@b")] and matrix.pairs[("m", "m@b")].max_abs == 0.0
    with pytest.raises(UsageError, match="share no image"):
        merge(a, OutputSet(["q"], ["dq"], meta={"label": "c"}))
