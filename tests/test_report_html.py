"""report.html a clinician can read: a verdict that says what was gated on what data with what n, semantic
tables (escaped), an ROC figure with the operating point marked, no figure for what did not run; report.md says
the same things as text. The report is built from the real gate functions on made-up scores."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fundus_edge.gate.gate import GateCriteria, evaluate, gate
from fundus_edge.gate.report import render_html, render_markdown, write_reports

# margins that 150 images can show (the defaults cannot: docs/gate.md); make_report(criteria=GateCriteria(...))
WIDE = GateCriteria(n_boot=200, min_delta_auc=-0.02, min_delta_sensitivity=-0.1, min_delta_specificity=-0.1,
                    max_flip_rate=0.06)


def make_report(fallback_steps: int = 1, description: str | None = None, synthetic: bool | None = None,
                name: str = "dr-test", criteria: GateCriteria = WIDE) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    y = (rng.random(150) < 0.35).astype(int)
    ref = np.clip(0.3 + 0.35 * y + rng.normal(0, 0.18, y.size), 0, 1)
    int8 = np.clip(ref + rng.normal(0, 0.01, y.size), 0, 1)
    crit = criteria
    t = float(np.quantile(ref[y == 1], 0.1))
    ref_eval = evaluate("onnx-fp32", y, ref, t, crit)
    g = gate("onnx-int8", y, ref, int8, t, crit, reference_eval=ref_eval)
    steps = [{"step": i, "excluded": [f"n{j}" for j in range(i)], "passed": i == fallback_steps - 1,
              "delta_auc": -0.001, "delta_sensitivity": 0.0, "flips": 3 - i, "int8_mac_fraction": 1 - 0.02 * i,
              "failures": []} for i in range(fallback_steps)]
    excluded = steps[-1]["excluded"]
    validation: dict[str, Any] = {"csv": "/data/labels.csv", "layout": "idrid", "n": int(y.size), "problems": []}
    if description is not None:
        validation["description"] = description
    if synthetic is not None:
        validation["synthetic"] = synthetic
    return {
        "name": name, "gate_passed": bool(g), "verdict": g.verdict, "criteria": crit.to_dict(),
        "operating_point": {"threshold": t, "rule": crit.operating_point, "locked_on": "onnx-fp32"},
        "reference": ref_eval.to_dict(), "gates": [g.to_dict()],
        "confusion": {"onnx-fp32": ref_eval.confusion, "onnx-int8": g.candidate_eval.confusion},
        "quantization": {"onnx-int8": {
            "tool": "ort", "format": "QDQ", "n_calibration": 16, "int8_mac_fraction": 0.97, "quantized_ops": {},
            "float_ops": {}, "config": {"calibrator": "minmax", "per_channel": True, "activation_type": "u8",
                                        "weight_type": "s8", "nodes_to_exclude": excluded},
            "fallback": {"passed": True, "excluded_nodes": excluded, "kept_in_float": {n: "Conv" for n in excluded},
                         "kept_in_float_detail": [{"node": n, "op_type": "Conv", "where": f"layer2.{n}"}
                                                  for n in excluded],
                         "int8_mac_fraction": steps[-1]["int8_mac_fraction"], "mostly_float": False,
                         "steps": steps}}},
        "layer_errors": [{"tensor": "getitem_30", "where": "layer3.0.conv1", "op_type": "Conv", "snr_db": 21.5,
                          "cosine": 0.998, "max_abs": 0.46},
                         {"tensor": "hardtanh_10", "op_type": "Clip", "snr_db": 25.0, "cosine": 0.999,
                          "max_abs": 0.43}],
        "validation": validation, "scores": {"onnx-fp32": ref.tolist(), "onnx-int8": int8.tolist()},
        "labels": y.tolist(),
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    write_reports(out, make_report(description="IDRiD test + HRF, real photographs, n=150", synthetic=False))
    return out


def test_report_html_has_tables_verdict_and_operating_point(written: Path) -> None:
    page = (written / "report.html").read_text()
    rep = json.loads((written / "report.json").read_text())
    assert "<pre>" not in page
    assert page.count("<table>") >= 3 and '<th scope="col">' in page and "<thead>" in page
    # the verdict: what was gated, on what data, n, how sure
    verdict = re.search(r'<section class="verdict passed".*?</section>', page, re.S)
    assert verdict, "the verdict header is missing"
    text = html.unescape(verdict.group(0))
    assert "Clinical gate: PASSED" in text and "onnx-int8" in text and "onnx-fp32" in text
    assert "IDRiD test + HRF, real photographs, n=150" in text and "n = 150 images" in text
    assert "95 % CI" in text and "no clinical claim" not in text
    # the ROC figure with each file's operating point, at the confusion counts of the gate
    assert 'id="fig-roc"' in page and "operating point" in page
    for name, r in rep["figures"]["roc"].items():
        c = rep["confusion"][name]
        assert r["operating_point"] == pytest.approx({"fpr": c["fp"] / (c["fp"] + c["tn"]),
                                                      "tpr": c["tp"] / (c["tp"] + c["fn"])})
    # layers named by module path where the report has one, units said
    assert "layer3.0.conv1" in page and "SNR (dB)" in page
    assert "Image name,Retinopathy grade" not in page  # the layout shows as CSV columns, lower-cased as read
    assert "CSV columns image name,retinopathy grade" in html.unescape(page)


def test_report_says_insufficient_evidence_and_what_would_show_it(tmp_path: Path) -> None:
    """The default margins on 150 images: no harm seen, but -1 pp / 1 % cannot be shown -> the report says so."""
    write_reports(tmp_path, make_report(criteria=GateCriteria(n_boot=200), synthetic=False))
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["verdict"] == "INSUFFICIENT EVIDENCE" and rep["gates"][0]["failures"] == []
    md = (tmp_path / "report.md").read_text()
    assert "Clinical gate: INSUFFICIENT EVIDENCE" in md and "Not shown:" in md and "images would show it" in md
    assert "Evidence: confidence bounds behind each verdict" in md and "Clopper-Pearson" in md


def test_no_figure_for_a_fallback_that_did_not_run(written: Path, tmp_path: Path) -> None:
    assert not list((written / "figures").glob("fallback*"))  # one step: plain int8 passed
    assert "Plain int8 passed the gate" in (written / "report.md").read_text()
    write_reports(tmp_path, make_report(fallback_steps=3))
    assert [p.name for p in (tmp_path / "figures").glob("fallback*")] == ["fallback-onnx-int8.png"]
    assert 'id="fig-fallback-onnx-int8"' in (tmp_path / "report.html").read_text()


def test_synthetic_or_unrecorded_data_is_said_in_the_verdict() -> None:
    for kwargs in ({"synthetic": True}, {}):
        page = render_html(make_report(**kwargs), {})
        verdict = html.unescape(re.search(r'<section class="verdict.*?</section>', page, re.S).group(0))
        assert "supports no clinical claim" in verdict
    assert "synthetic images" in render_markdown(make_report(synthetic=True))
    assert "real or synthetic: not recorded" in render_markdown(make_report())


def test_text_is_escaped_and_markdown_says_the_same(tmp_path: Path) -> None:
    rep = make_report(name="<script>alert(1)</script>", description="A & B <i>")
    page = render_html(rep, {})
    assert "<script>" not in page and "&lt;script&gt;" in page and "A &amp; B &lt;i&gt;" in page
    md = render_markdown(rep)
    # every table cell of report.md is in report.html
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            for cell in (c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")):
                assert html.escape(cell, quote=True) in page, cell
