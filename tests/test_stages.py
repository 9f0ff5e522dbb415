"""Unit tests of the build's stage helpers: progress lines, the format registry, the shared gate stage, and the
check's text. Cheap: no model, no export (the stage sequence itself is covered by test_build_bundle.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fundus_edge.errors import MissingDependencyError, UsageError
from fundus_edge.gate import stage as gate_stage
from fundus_edge.gate.gate import GateCriteria
from fundus_edge.gate.stage import GateArtifact, GateData, gate_scores, score_artifacts
from fundus_edge.pipeline.build import n_stages
from fundus_edge.pipeline.config import BuildConfig
from fundus_edge.pipeline.formats import REFERENCE_FORMAT, REGISTRY, build_formats
from fundus_edge.pipeline.progress import Progress
from fundus_edge.runtime.backends import BACKENDS_BY_FORMAT


def test_progress_numbers_stages_and_counts_in_tenths() -> None:
    lines: list[str] = []
    p = Progress(lines.append, 3)
    p.stage("first")
    p.say("detail")
    p.stage("second")
    count = p.counter("images")
    for i in range(1, 21):
        count(i, 20)
    assert lines[:3] == ["[1/3] first", "      detail", "[2/3] second"]
    counts = [ln for ln in lines if "images:" in ln]
    assert counts[0] == "      images: 2/20" and counts[-1] == "      images: 20/20" and len(counts) == 10
    assert p.seconds().endswith("s")


def test_stage_count_matches_the_stages_run_build_runs() -> None:
    # load, prepare, export (+ quantize) per format, gate, write
    assert n_stages(2, True) == 8 and n_stages(1, True) == 6 and n_stages(1, False) == 5


def test_registry_formats_have_runtime_backends_and_distinct_files() -> None:
    assert REFERENCE_FORMAT in REGISTRY
    for name, spec in REGISTRY.items():
        assert spec.name == name and spec.backend == BACKENDS_BY_FORMAT[name]
        assert spec.artifact_id("int8") == f"{name}-int8"
    names = [spec.file_name(p) for spec in REGISTRY.values() for p in ("fp32", "int8")]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("formats", [(), ("tflite",), ("onnx", "onnx"), ("onnx", "coreml"), ("tflite", "onnx")])
def test_build_formats_rejects_what_the_reference_rule_forbids(formats: tuple[str, ...]) -> None:
    with pytest.raises(UsageError, match="--formats"):
        build_formats(BuildConfig(model="x", out=Path("o"), formats=formats))


def test_build_formats_keeps_the_order_reference_first() -> None:
    assert [f.name for f in build_formats(BuildConfig(model="x", out=Path("o"), formats=("onnx",)))] == ["onnx"]


def _data(n: int = 80, seed: int = 0) -> tuple[GateData, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(int)
    ref = np.clip(0.5 * y + rng.uniform(0, 0.5, n), 0, 1)
    return GateData(np.zeros((n, 3, 4, 4), np.float32), "NCHW", y, [1]), ref


def test_gate_scores_gates_each_candidate_against_the_reference() -> None:
    data, ref = _data(2000)  # enough images for an identical file to PASS the default margins (docs/gate.md)
    crit = GateCriteria(n_boot=50)
    bad = ref.copy()
    bad[data.labels == 1] -= 0.4  # many referable eyes fall below the threshold
    out = gate_scores({"a-fp32": ref, "a-int8": ref.copy(), "b-int8": bad}, data, "a-fp32", 0.5, crit,
                      {"a-int8": 0.99, "b-int8": 0.99})
    assert list(out.evaluations) == ["a-fp32", "a-int8", "b-int8"]
    assert [g.artifact for g in out.gates] == ["a-int8", "b-int8"]
    assert out.gates[0].passed and out.gates[0].flips == 0
    assert not out.gates[1].passed and out.gates[1].delta_sensitivity < 0
    assert not out.passed
    # the candidate's evaluation is the one its gate computed, and it matches a plain evaluation
    assert out.evaluations["b-int8"] is out.gates[1].candidate_eval
    assert out.reference_eval.sensitivity == pytest.approx(float((ref[data.labels == 1] >= 0.5).mean()))
    assert out.verdict == "FAIL" and out.gates[0].verdict == "PASS"


def test_gate_scores_certifies_a_searched_file_on_its_certification_part_only() -> None:
    data, ref = _data(80)
    cert = np.arange(40, 80)
    out = gate_scores({"a-fp32": ref, "a-int8": ref.copy(), "b-int8": ref.copy()}, data, "a-fp32", 0.5,
                      GateCriteria(n_boot=50), certify={"a-int8": cert})
    a, b = out.gates
    assert a.certification == {"images": "certification part", "n": 40, "indices": list(range(40, 80))}
    assert a.candidate_eval.n == 40 and b.certification == {"images": "all", "n": 80}
    # 40 (or 80) identical decisions cannot show a 1 % flip limit: no harm, but not a PASS
    assert a.verdict == b.verdict == out.verdict == "INSUFFICIENT EVIDENCE" and not out.passed
    assert out.evaluations["a-int8"].n == 80  # the table of metrics stays on all images


def test_gate_scores_without_a_reference_evaluates_only() -> None:
    data, ref = _data()
    out = gate_scores({"x-int8": ref}, data, "x-fp32", 0.5, GateCriteria(n_boot=50), relative=False)
    assert out.gates == [] and list(out.evaluations) == ["x-int8"] and out.passed


def test_score_artifacts_reuses_known_scores_and_skips_unrunnable_formats(monkeypatch: Any) -> None:
    data, ref = _data(20)
    calls: list[tuple[str, int]] = []

    def fake(art: GateArtifact, d: GateData, settings: Any, n: int | None = None) -> tuple[np.ndarray, float]:
        if art.format == "missing":
            raise MissingDependencyError("somert", "device", "The somert backend")
        calls.append((art.id, len(d.tensors) if n is None else n))
        return ref, 1.5

    monkeypatch.setattr(gate_stage, "score_artifact", fake)
    arts = [GateArtifact("a-fp32", "onnx", "NCHW", Path("a")), GateArtifact("m-fp32", "missing", "NCHW", Path("m")),
            GateArtifact("a-int8", "onnx", "NCHW", Path("b"))]
    got = score_artifacts(arts, data, None, known={"a-int8": ref}, required=())
    assert list(got.scores) == ["a-fp32", "a-int8"] and "somert" in got.skipped["m-fp32"]
    # the known scores are not recomputed, only timed on a few images
    assert calls == [("a-fp32", 20), ("a-int8", gate_stage.TIMING_IMAGES)]
    with pytest.raises(MissingDependencyError):
        score_artifacts(arts, data, None, required=("m-fp32",))


def test_format_check_says_what_was_gated() -> None:
    from fundus_edge.cli.check_format import format_check
    from fundus_edge.gate.drift import operating_point_drift
    from fundus_edge.pipeline.check import CheckResult

    data, ref = _data()
    out = gate_scores({"onnx-fp32": ref, "onnx-int8": ref}, data, "onnx-fp32", 0.5, GateCriteria(n_boot=50))
    drift = operating_point_drift("onnx-fp32", data.labels, ref, 0.5, {"sensitivity": 0.9})
    res = CheckResult("b-1", "v.csv", 80, 40, 0.5, "sensitivity>=0.9", out.passed, "onnx-fp32", True,
                      out.evaluations, out.gates, skipped={"tflite-int8": "no LiteRT"}, drift=drift)
    text = format_check(res)
    assert text.splitlines()[0].startswith("bundle b-1: 80 images (40 referable) from v.csv; threshold 0.5000")
    assert "tflite-int8 not checked: no LiteRT" in text and "gate onnx-int8 vs onnx-fp32" in text
    assert "not shown: 0 decisions flipped" in text and "about 299 images would show it" in text
    assert "operating point onnx-fp32   sensitivity 1.0000 (95% CI 0.912-1.000, n 40) vs target 0.9000 -> OK" in text
    assert text.endswith("check: INSUFFICIENT EVIDENCE") and "text" not in res.to_dict()
    assert res.to_dict()["verdict"] == "INSUFFICIENT EVIDENCE" and res.to_dict()["drift"][0]["target"] == 0.9
