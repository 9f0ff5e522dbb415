"""Calibration stability (``check --stability K``) and the device gate's image sample (``--device-images``)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fundus_edge.cli import main
from fundus_edge.gate.gate import GateCriteria, gate
from fundus_edge.pipeline.device_gate import select_images
from fundus_edge.quantization.stability import Stability, StabilityRun


def test_device_sample_is_stratified_seeded_and_recorded() -> None:
    y = np.array([0] * 177 + [1] * 123)
    idx, how = select_images(y, 10, seed=3)
    assert len(idx) == len(set(idx.tolist())) == 10 and list(idx) == sorted(idx)
    assert int(y[idx].sum()) == round(10 * 123 / 300)  # in proportion: 4 referable, 6 not
    assert np.array_equal(idx, select_images(y, 10, seed=3)[0])
    assert not np.array_equal(idx, select_images(y, 10, seed=4)[0])
    assert "seed 3" in how and "10 of 300" in how
    rare = np.array([0] * 99 + [1])
    assert rare[select_images(rare, 6)[0]].sum() == 1  # a rare class is still represented
    all_idx, how_all = select_images(y, None)
    assert np.array_equal(all_idx, np.arange(300)) and how_all == "all gate images"


def _run(seed: int, y: np.ndarray, ref: np.ndarray, cand: np.ndarray) -> StabilityRun:
    return StabilityRun(seed, [seed], f"sha{seed}", gate(f"r{seed}", y, ref, cand, 0.5, GateCriteria(n_boot=200)))


def test_stability_rule_flags_a_spread_of_flips() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.4).astype(int)
    ref = np.clip(y * 0.5 + rng.normal(0.25, 0.2, 400), 0, 1)
    near = np.flatnonzero(np.abs(ref - 0.5) < 0.1)
    runs = [_run(1, y, ref, ref.copy())]
    moved = ref.copy()
    moved[near[:8]] = 1.0 - moved[near[:8]]  # 8 decisions near the threshold move: one calibration draw's luck
    runs.append(_run(2, y, ref, moved))
    s = Stability("onnx-int8", 2, ["a"], 1, "test", runs, len(y), GateCriteria())
    flips = [r.gate.flips for r in runs]
    assert s.spread("flips") == {"min": min(flips), "median": float(np.median(flips)), "max": max(flips),
                                 "range": max(flips) - min(flips)}
    assert flips[0] == 0 and flips[1] >= 5 > s.flip_allowance == 4
    assert s.unstable and any("flips range" in r for r in s.reasons)
    same = Stability("onnx-int8", 2, ["a"], 1, "test", [runs[0], _run(3, y, ref, ref.copy())], len(y),
                     GateCriteria())
    assert not same.unstable and same.spread("delta_auc")["range"] == 0.0


def test_cached_subset_equals_calibrating_on_the_subset(built: Any, synth_calib: Path, synth_val: Path) -> None:
    """The cheap path (per-image ranges merged into onnxruntime's cache) gives the file calibrating on the
    subset itself gives: identical outputs."""
    import onnx

    from fundus_edge.bundle.read import load_bundle
    from fundus_edge.quantization.calibration import prepare_inputs
    from fundus_edge.quantization.quantize_onnx import preprocess_for_quantization, quantize_onnx
    from fundus_edge.quantization.stability import per_image_ranges, write_cache
    from fundus_edge.runtime.backends import run_backend

    b = load_bundle(built.out)
    fp32 = b.path(b.artifact("onnx-fp32"))
    pool = prepare_inputs(sorted(map(str, synth_calib.glob("*.jpg")))[:12], b.preprocessing).tensors
    val = prepare_inputs(sorted(map(str, synth_val.parent.glob("*.jpg")))[:6], b.preprocessing).tensors
    name = onnx.load(str(fp32), load_external_data=False).graph.input[0].name
    subset = np.array([1, 4, 5, 9])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pre = preprocess_for_quantization(fp32, work / "pre.onnx")
        write_cache(per_image_ranges(pre, pool, name, work), subset, work / "cache.json")
        quantize_onnx(fp32, work / "cached.onnx", pool[subset], name, cache_path=work / "cache.json",
                      preprocessed=pre)
        quantize_onnx(fp32, work / "direct.onnx", pool[subset], name, preprocessed=pre)
        quantize_onnx(fp32, work / "other.onnx", pool[[0, 2, 3, 11]], name, preprocessed=pre)
        out = {k: run_backend("onnx", work / f"{k}.onnx", val)[0] for k in ("cached", "direct", "other")}
    assert np.array_equal(out["cached"], out["direct"])
    assert not np.array_equal(out["cached"], out["other"])  # another subset gives another file: the test can fail


def test_check_stability_reports_k_real_subsets(built: Any, synth_calib: Path, synth_val: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", "--bundle", str(built.out), "--val", str(synth_val), "--artifact", "onnx-int8",
                 "--stability", "3", "--calib", str(synth_calib), "--calib-size", "24", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code in (0, 8, 15)
    st = doc["stability"]
    runs = st["runs"]
    assert st["k"] == 3 == len(runs) and st["calibration_pool"] == 64 and st["calib_size"] == 24
    subsets = [tuple(r["calibration_indices"]) for r in runs]
    assert len(set(subsets)) == 3 and all(len(set(s)) == 24 and max(s) < 64 for s in subsets)
    assert len({r["sha256"] for r in runs}) >= 2  # different calibration ranges, different files
    for key in ("delta_auc", "flips"):
        v = [r[key] for r in runs]
        assert st["spread"][key] == {"min": min(v), "median": float(np.median(v)), "max": max(v),
                                     "range": max(v) - min(v)}
    flips = [r["flips"] for r in runs]
    auc = [r["delta_auc"] for r in runs]
    verdicts = {r["verdict"] for r in runs}
    expect = (max(flips) - min(flips) > max(1, int(0.01 * doc["n"])) or max(auc) - min(auc) > 0.005
              or ("FAIL" in verdicts and len(verdicts) > 1))
    assert st["unstable"] == expect == bool(st["reasons"])
    assert st["shipped"]["artifact"] == "onnx-int8" and st["shipped"]["flips"] == doc["gates"][0]["flips"]
    assert st["n_images"] == doc["n"] == 300


def test_options_that_need_a_partner_are_refused_before_any_work(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["build", "--model", "reference:dr-resnet18s", "--calib", str(tmp_path), "--val",
                 str(tmp_path / "labels.csv"), "--out", str(out), "--device-gate"]) == 2
    assert "--device-gate needs --device" in capsys.readouterr().err and not out.exists()
    assert main(["check", "--bundle", str(tmp_path), "--val", str(tmp_path / "labels.csv"), "--stability", "3"]) == 2
    assert "--stability K needs --calib" in capsys.readouterr().err
