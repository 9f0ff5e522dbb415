"""int8 quantization internals: op coverage, exclusions, calibration cache, calibrators, per-layer debugger,
non-inferiority and the report's figures."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from fundus_edge.datasets.labels import list_images
from fundus_edge.gate.noninferiority import paired_bootstrap
from fundus_edge.gate.plots import roc_points
from fundus_edge.quantization.calibration import ArrayCalibrationReader, prepare_inputs
from fundus_edge.quantization.debug import layer_errors
from fundus_edge.quantization.quantize_onnx import OnnxQuantConfig, preprocess_for_quantization, quantize_onnx
from fundus_edge.runtime.preprocess import PreprocessSpec


@pytest.fixture(scope="module")
def qsetup(built: Any, synth_calib: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("q")
    fp32 = built.out / "model.fp32.onnx"
    pre = preprocess_for_quantization(fp32, tmp / "pre.onnx")
    calib = prepare_inputs(list_images(synth_calib)[:24], PreprocessSpec()).tensors
    return {"fp32": fp32, "pre": pre, "calib": calib, "tmp": tmp}


def test_reader_contract() -> None:
    x = np.zeros((3, 3, 8, 8), np.float32)
    r = ArrayCalibrationReader(x, "input")
    feeds = [r.get_next() for _ in range(4)]
    assert [f is None for f in feeds] == [False, False, False, True]
    assert feeds[0] is not None and feeds[0]["input"].shape == (1, 3, 8, 8)
    r.rewind()
    assert len(list(r)) == 3


def test_full_int8_coverage_and_exclusion(qsetup: dict[str, Any]) -> None:
    cache = qsetup["tmp"] / "cache.json"
    full = quantize_onnx(qsetup["fp32"], qsetup["tmp"] / "full.onnx", qsetup["calib"], "input",
                         cache_path=cache, preprocessed=qsetup["pre"])
    assert full.op_counts["QuantizeLinear"] > 20 and full.op_counts["DequantizeLinear"] > 40
    assert full.quantized_ops["Conv"] == 20 and full.float_ops.get("Conv", 0) == 0
    assert full.int8_mac_fraction == pytest.approx(1.0, abs=1e-3)
    assert cache.is_file()
    import onnx

    first_conv = next(n.name for n in onnx.load(str(qsetup["pre"])).graph.node if n.op_type == "Conv")
    t0 = time.perf_counter()
    part = quantize_onnx(qsetup["fp32"], qsetup["tmp"] / "part.onnx", qsetup["calib"], "input",
                         OnnxQuantConfig(nodes_to_exclude=(first_conv,)), cache_path=cache,
                         preprocessed=qsetup["pre"])
    assert time.perf_counter() - t0 < full.seconds * 2  # cached ranges: no second calibration pass needed
    assert part.float_ops.get("Conv") == 1 and part.quantized_ops["Conv"] == 19
    assert 0.5 < part.int8_mac_fraction < full.int8_mac_fraction


def test_cache_reuses_ranges(qsetup: dict[str, Any]) -> None:
    cache = qsetup["tmp"] / "cache2.json"
    a = quantize_onnx(qsetup["fp32"], qsetup["tmp"] / "a.onnx", qsetup["calib"], "input", cache_path=cache,
                      preprocessed=qsetup["pre"])
    ranges = json.loads(cache.read_text())
    # a cached run with *different* (garbage) calibration data must give the same model: ranges come from cache
    b = quantize_onnx(qsetup["fp32"], qsetup["tmp"] / "b.onnx", qsetup["calib"] * 0 + 5.0, "input",
                      cache_path=cache, preprocessed=qsetup["pre"])
    assert json.loads(cache.read_text()) == ranges
    assert a.path.read_bytes() == b.path.read_bytes()


@pytest.mark.parametrize("calibrator", ["entropy", "percentile"])
def test_other_calibrators_produce_models(qsetup: dict[str, Any], calibrator: str) -> None:
    q = quantize_onnx(qsetup["fp32"], qsetup["tmp"] / f"{calibrator}.onnx", qsetup["calib"][:8], "input",
                      OnnxQuantConfig(calibrator=calibrator), preprocessed=qsetup["pre"])
    assert q.quantized_ops["Conv"] == 20 and q.config.calibrator == calibrator


def test_layer_debugger(qsetup: dict[str, Any]) -> None:
    q = quantize_onnx(qsetup["fp32"], qsetup["tmp"] / "dbg.onnx", qsetup["calib"], "input",
                      preprocessed=qsetup["pre"])
    errs = layer_errors(qsetup["pre"], q.path, qsetup["calib"], "input", max_images=3)
    assert len(errs) >= 20
    assert all(np.isfinite(e.snr_db) and 5 < e.snr_db < 80 for e in errs)
    assert all(0.9 < e.cosine <= 1.0 + 1e-9 for e in errs)
    assert "Conv" in {e.op_type for e in errs} and len({e.op_type for e in errs}) >= 2


def test_paired_bootstrap_matches_direct_resampling() -> None:
    rng = np.random.default_rng(5)
    y = (rng.random(150) < 0.4).astype(int)
    ref = np.clip(rng.normal(0.3 + 0.4 * y, 0.2), 0, 1)
    cand = np.clip(ref + rng.normal(0, 0.03, len(y)), 0, 1)
    t = 0.5
    ni = paired_bootstrap(y, ref, cand, t, n_boot=200, seed=3)
    assert ni == paired_bootstrap(y, ref, cand, t, n_boot=200, seed=3)
    rng2 = np.random.default_rng(3)
    da, ds = [], []
    while len(da) < 200:
        idx = rng2.integers(0, len(y), len(y))
        if 0 < y[idx].sum() < len(y):
            yb = y[idx]
            da.append(roc_auc_score(yb, cand[idx]) - roc_auc_score(yb, ref[idx]))
            pos = yb == 1
            ds.append(np.mean(cand[idx][pos] >= t) - np.mean(ref[idx][pos] >= t))
    assert ni.delta_auc_ci[0] == pytest.approx(np.quantile(da, 0.025))
    assert ni.delta_sensitivity_ci[1] == pytest.approx(np.quantile(ds, 0.975))


def test_roc_points_match_sklearn() -> None:
    rng = np.random.default_rng(2)
    y = (rng.random(200) < 0.3).astype(int)
    s = np.round(rng.random(200) + 0.3 * y, 2)
    fpr, tpr, thr = roc_points(y, s)
    f2, t2, th2 = roc_curve(y, s, drop_intermediate=False)
    assert np.allclose(fpr, f2) and np.allclose(tpr, t2) and np.allclose(thr[1:], th2[1:])
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc_score(y, s))


def test_report_html_and_figure_data(built: Any) -> None:
    out = built.out
    assert (out / "report.html").is_file()
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert any(f"Clinical gate: {v}" in html for v in ("PASSED", "PASS", "INSUFFICIENT EVIDENCE")), html[:2000]
    for name in ("roc", "confusion", "layers"):
        png = out / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads((out / "report.json").read_text())
    y = np.array(rep["labels"])
    for name, r in rep["figures"]["roc"].items():
        fpr, tpr, _ = roc_curve(y, np.array(rep["scores"][name]), drop_intermediate=False)
        assert np.allclose(r["fpr"], fpr, atol=1e-6) and np.allclose(r["tpr"], tpr, atol=1e-6)
        assert np.trapezoid(r["tpr"], r["fpr"]) == pytest.approx(
            rep["reference"]["auc"] if name == "onnx-fp32"
            else next(g["auc"] for g in rep["gates"] if g["artifact"] == name), abs=1e-5)
    c = rep["figures"]["confusion"]["onnx-int8"]
    assert c == rep["gates"][0]["confusion"]
    assert len(rep["figures"]["layers"]) > 0
    assert set(built.manifest["files"]) >= {"report.html", "figures/roc.png"}
