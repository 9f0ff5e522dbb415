"""The trunk end to end: build a bundle from the shipped reference model, then use it torch-free."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fundus_edge.bundle.read import MANIFEST, sha256_file
from fundus_edge.errors import BundleError, BundleIntegrityError, GateFailedError, UsageError
from fundus_edge.gate.gate import GateCriteria
from fundus_edge.pipeline.build import BuildConfig, run_build
from fundus_edge.quantization.fallback import FallbackBudget
from fundus_edge.runtime import load, load_bundle


def test_build_writes_a_verified_bundle_that_passes_the_gate(built: Any) -> None:
    # 300 validation images cannot show the default margins (docs/gate.md): no harm observed, the verdict says
    # how sure it is, and the fixture builds with --allow-insufficient-evidence, which the manifest records
    m = built.manifest
    assert m["gate"]["verdict"] in ("PASS", "INSUFFICIENT EVIDENCE")
    assert built.gate_passed == (m["gate"]["verdict"] == "PASS")
    assert m["gate"]["allow_insufficient_evidence"] is True
    assert all(e["verdict"] != "FAIL" for e in m["gate"]["summary"].values())
    assert m["schema"] == "fundus-edge/bundle" and m["schema_version"] == 2 and m["task"] == "classification"
    ids = {a["id"]: a for a in m["artifacts"]}
    assert set(ids) == {"onnx-fp32", "onnx-int8", "tflite-fp32", "tflite-int8"}  # build makes both formats
    assert m["default_artifact"] == "onnx-int8"
    for rel, entry in m["files"].items():
        assert sha256_file(built.out / rel) == entry["sha256"]
    assert {"report.json", "report.md", "model.fp32.onnx", "model.int8.onnx"} <= set(m["files"])
    assert m["preprocessing"]["size"] == 224
    assert m["output"]["meaning"]["positive_classes"] == [1]
    assert m["output"]["meaning"]["class_names"] == ["no-referable", "referable"]
    assert 0.0 < m["operating_point"]["threshold"] < 1.0
    assert m["operating_point"]["sensitivity"] >= 0.90
    assert m["producer"]["torch"] and m["producer"]["onnxruntime"]
    q = m["quantization"]["onnx-int8"]
    assert q["config"]["activation_type"] == "uint8" and q["config"]["weight_type"] == "int8"
    assert q["int8_mac_fraction"] > 0.99
    assert q["quantized_ops"]["Conv"] >= 20
    assert q["n_calibration"] == 64


def test_report_numbers(built: Any) -> None:
    rep = json.loads((built.out / "report.json").read_text())
    ref = rep["reference"]
    assert ref["auc"] >= 0.9  # the reference model is good enough for the gate to mean something
    assert ref["auc_ci"][0] < ref["auc"] < ref["auc_ci"][1]
    g = rep["gates"][0]
    assert g["artifact"] == "onnx-int8" and g["verdict"] != "FAIL" and not g["failures"]
    assert g["flip_rate"] <= 0.01 and g["delta_auc"] >= -0.005 and g["delta_sensitivity"] >= -0.01
    # the verdict's bounds: one per criterion, each on the right side of its estimate; the certifying images
    ev = {f["name"]: f for f in g["evidence"]["findings"]}
    assert set(ev) == {"delta_auc", "delta_sensitivity", "delta_specificity", "flip_rate"}
    assert ev["flip_rate"]["bound"] >= ev["flip_rate"]["estimate"] and ev["delta_sensitivity"]["bound"] <= \
        ev["delta_sensitivity"]["estimate"]
    assert g["evidence"]["flips_in_band"] + g["evidence"]["flips_outside_band"] == g["flips"]
    assert (g["verdict"] == "PASS") == (not g["insufficient"])
    assert g["certification"] == {"images": "all", "n": ref["n"]}  # plain int8: no search, all images certify
    assert len(rep["images"]["certification"]) == ref["n"] and rep["images"]["search"] == []
    # the report's numbers are recomputable from the stored scores
    from fundus_edge.gate.metrics import auc

    y = np.array(rep["labels"])
    assert auc(y, np.array(rep["scores"]["onnx-int8"])) == pytest.approx(g["auc"])
    md = (built.out / "report.md").read_text()
    assert f"Clinical gate: {rep['verdict'].replace('PASS', 'PASSED')}" in md and "onnx-int8" in md
    assert "Evidence: confidence bounds behind each verdict" in md and "sensitivity" in md


def test_screen_real_photos_and_a_corrupt_file(built: Any, real_photos: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    with load(built.out) as s:
        results = list(s.screen_many([*map(str, real_photos), str(bad)]))
    assert [bool(r) for r in results] == [True] * len(real_photos) + [False]
    for r in results[:-1]:
        assert r.decision in ("refer", "no-refer") and 0.0 <= r.probability <= 1.0
        assert r.artifact == "onnx-int8" and set(r.timings_ms) >= {"decode", "preprocess", "infer"}
    assert results[-1].error is not None and results[-1].error["code"] in ("not-an-image", "decode-failed")


def test_screen_matches_gate_scores(built: Any, synth_val: Path) -> None:
    """The runtime's screen() gives the very probabilities the gate measured."""
    rep = json.loads((built.out / "report.json").read_text())
    sources = rep["validation"]["n"]
    assert sources == 300
    from fundus_edge.datasets.labels import read_labels

    paths = read_labels(synth_val).paths[:10]
    with load(built.out, artifact="onnx-int8") as s:
        probs = [s.screen(p).probability for p in paths]
    assert np.allclose(probs, rep["scores"]["onnx-int8"][:10], atol=1e-5)


def test_flipped_byte_is_refused_naming_the_file(bundle_copy: Path) -> None:
    model = bundle_copy / "model.int8.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=r"model\.int8\.onnx"):
        load(bundle_copy)


def test_manifest_tampering_and_schema(bundle_copy: Path) -> None:
    mpath = bundle_copy / MANIFEST
    m = json.loads(mpath.read_text())
    m["schema_version"] = 99
    mpath.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="schema version 99"):
        load_bundle(bundle_copy)
    m["schema_version"] = 2
    m["files"]["model.fp32.onnx"]["sha256"] = "0" * 64
    mpath.write_text(json.dumps(m))
    with pytest.raises(BundleIntegrityError, match=r"model\.fp32\.onnx"):
        load_bundle(bundle_copy)


def test_missing_file_and_not_a_bundle(bundle_copy: Path, tmp_path: Path) -> None:
    (bundle_copy / "report.md").unlink()
    with pytest.raises(BundleIntegrityError, match=r"report\.md is missing"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="not a bundle directory"):
        load_bundle(tmp_path / "nothing")


def test_impossible_gate_writes_no_bundle(tmp_path: Path, synth_val: Path, synth_calib: Path) -> None:
    out = tmp_path / "strict"
    cfg = BuildConfig(model="reference:dr-resnet18s", out=out, calib=synth_calib, val=synth_val, calib_size=8,
                      criteria=GateCriteria(min_delta_auc=0.5, n_boot=50),
                      fallback_budget=FallbackBudget(max_trials=2, max_ranked_nodes=3, tuning_images=8),
                      formats=("onnx",))  # CI time: the gate-failure path does not depend on the formats
    with pytest.raises(GateFailedError, match="AUC dropped") as exc:
        run_build(cfg, log=lambda s: None)
    assert "the best kept" in str(exc.value) and "flips" in str(exc.value)  # the best candidate's numbers
    assert exc.value.exit_code == 8
    assert not out.exists()
    report = json.loads((tmp_path / "strict.gate-failed" / "report.json").read_text())
    assert report["gate_passed"] is False
    fb = report["quantization"]["onnx-int8"]["fallback"]
    assert not fb["passed"] and len(fb["steps"]) == 3 and len(fb["ranking"]) == 3
    assert not list(tmp_path.glob(".strict.staging*"))
    # with --allow-failed-gate the bundle is written and says so; the default artifact stays fp32
    cfg.allow_failed_gate = True
    cfg.fallback = False
    result = run_build(cfg, log=lambda s: None)
    m = load_bundle(out).manifest
    assert not result.gate_passed and m["gate"]["passed"] is False and m["gate"]["allow_failed_gate"] is True
    assert m["default_artifact"] == "onnx-fp32"
    with pytest.raises(UsageError, match="not empty"):
        run_build(cfg, log=lambda s: None)
