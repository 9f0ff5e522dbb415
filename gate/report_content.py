"""What the build/check report says, as content blocks (see :mod:`.report_blocks`): the verdict first (what was
gated, on what data, with what n and how sure), then one section per part of the build."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..datasets.labels import LAYOUTS
from .quality_gate import quality_section
from .report_blocks import Block, Bullets, Figure, Para, Section, Table, Verdict, fmt
from .report_evidence import certification_line, evidence_section


def validation_origin(report: dict[str, Any]) -> tuple[str, bool | None]:
    """(what the validation data is, True if synthetic / False if real / None if not recorded)."""
    v = report.get("validation") or {}
    synthetic = v.get("synthetic")
    desc = str(v.get("description") or "")
    if desc:
        if synthetic is None and "synthetic" in desc.lower():
            synthetic = True
        return desc, synthetic
    if synthetic is True:
        return "synthetic images (fundus-edge synth)", True
    if synthetic is False:
        return "real photographs", False
    return f"the images listed in {Path(str(v.get('csv', '?'))).name} (real or synthetic: not recorded)", None


def _sens_half_width(sens: float, n_pos: int) -> float:
    """95 % half-width of a sensitivity measured on ``n_pos`` referable images (normal approximation)."""
    return 1.96 * math.sqrt(max(sens * (1 - sens), 0.25 / max(n_pos, 1)) / max(n_pos, 1))


def verdict(report: dict[str, Any]) -> Verdict:
    ref, op, gates = report["reference"], report["operating_point"], report["gates"]
    passed = bool(report["gate_passed"])
    word = report.get("verdict") or ("PASS" if passed else "FAIL")
    names = ", ".join(g["artifact"] for g in gates) or "no artifact"
    within = {"PASS": "shown within", "FAIL": "not all within"}.get(word, "not shown to be within")
    headline = (f"Clinical gate: {'PASSED' if word == 'PASS' else word.replace('FAIL', 'FAILED')} — {names} "
                f"{within} the gate's margins of the fp32 reference {ref['name']}"
                f" (one-sided {report['criteria'].get('confidence', 0.95):.0%} bounds)")
    data, synthetic = validation_origin(report)
    n, n_pos = int(ref["n"]), round(ref["n"] * ref["prevalence"])
    v = report.get("validation") or {}
    lines = [f"Gated on: {data}; n = {n} images, {n_pos} referable ({ref['prevalence']:.1%}); "
             f"{len(v.get('problems', []))} label rows skipped."]
    lines.append(f"Operating point: threshold {op['threshold']:.4f}, locked on {op['locked_on']} ({op['rule']}): "
                 f"sensitivity {ref['sensitivity']:.3f} (±{_sens_half_width(ref['sensitivity'], n_pos):.3f} "
                 f"with {n_pos} referable images), specificity {ref['specificity']:.3f}.")
    sure = [f"reference AUC {ref['auc']:.3f} (95 % CI {ref['auc_ci'][0]:.3f}–{ref['auc_ci'][1]:.3f})"]
    for g in gates:
        ni = g.get("noninferiority")
        if ni:
            sure.append(f"{g['artifact']} ΔAUC {ni['delta_auc']:+.4f} ({ni.get('level', 0.95):.0%} CI "
                        f"{ni['delta_auc_ci'][0]:+.4f} to {ni['delta_auc_ci'][1]:+.4f})")
    lines.append("How sure: " + "; ".join(sure) + ".")
    if certification_line(report):
        lines.append(certification_line(report))
    warnings = []
    if any(g["failures"] for g in gates):
        warnings.append("Failed: " + "; ".join(f"{g['artifact']}: {f}" for g in gates for f in g["failures"]))
    if word == "INSUFFICIENT EVIDENCE":
        warnings.append("Not shown: " + "; ".join(f"{g['artifact']}: {f}" for g in gates
                                                   for f in g.get("insufficient", []))
                        + (" — written with --allow-insufficient-evidence" if report.get("allow_insufficient_evidence")
                           else ""))
    if synthetic is not False:
        warnings.append("Synthetic or unrecorded validation data tests the pipeline only and supports no clinical "
                        "claim." if synthetic is None else
                        "Synthetic validation data: this tests the pipeline only and supports no clinical claim.")
    return Verdict(passed, headline, lines, warnings)


def gate_section(report: dict[str, Any]) -> Section:
    ref, crit = report["reference"], report["criteria"]
    rows = [(f"{ref['name']} (reference)", f"{ref['auc']:.4f} ({ref['auc_ci'][0]:.3f}–{ref['auc_ci'][1]:.3f})",
             f"{ref['sensitivity']:.4f}", f"{ref['specificity']:.4f}", "-", "-", "-", "reference")]
    classes = ["ref"]
    for g in report["gates"]:
        rows.append((g["artifact"], f"{g['auc']:.4f} ({g['auc_ci'][0]:.3f}–{g['auc_ci'][1]:.3f})",
                     f"{g['sensitivity']:.4f}", f"{g['specificity']:.4f}", f"{g['delta_auc']:+.4f}",
                     f"{g['delta_sensitivity']:+.4f}", f"{g['flips']} ({g['flip_rate']:.1%})",
                     g.get("verdict") or ("PASS" if g["passed"] else "FAIL")))
        classes.append("pass" if g["passed"] else "fail")
    v = report.get("validation") or {}
    cols = ",".join(LAYOUTS.get(v.get("layout", ""), (str(v.get("layout", "?")),)))
    grade = f"; referable = grade ≥ {v['referable_from']}" if "referable_from" in v else ""
    return Section("Gate: every shipped file against the fp32 reference", [
        Table(("artifact", "AUC (95 % CI)", "sensitivity", "specificity", "ΔAUC", "Δsensitivity",
               "decision flips", "gate"), rows, row_classes=tuple(classes)),
        Para(f"Margins: ΔAUC ≥ {crit['min_delta_auc']}, Δsensitivity ≥ {crit['min_delta_sensitivity']}, "
             f"Δspecificity ≥ {crit.get('min_delta_specificity', '-')}, "
             f"decision flips ≤ {crit['max_flip_rate']:.1%} of images; PASS needs each one-sided bound inside "
             f"(see the evidence section). AUC CIs: percentile bootstrap, "
             f"{crit['n_boot']} resamples, seed {crit['seed']}. Labels read from {Path(str(v.get('csv', '?'))).name} "
             f"(CSV columns {cols}{grade})."),
    ])


def confusion_section(report: dict[str, Any]) -> Section | None:
    if not report.get("confusion"):
        return None
    rows = []
    for name, c in report["confusion"].items():
        pos, neg = c["tp"] + c["fn"], c["fp"] + c["tn"]
        rows.append((name, str(c["tp"]), str(c["fn"]), str(c["fp"]), str(c["tn"]),
                     f"{c['tp'] / pos:.3f}" if pos else "-", f"{c['tn'] / neg:.3f}" if neg else "-"))
    return Section("Decisions at the operating point", [
        Table(("artifact", "referable, referred (TP)", "referable, missed (FN)", "not referable, referred (FP)",
               "not referable, not referred (TN)", "sensitivity", "specificity"), rows),
    ])


def noninferiority_section(report: dict[str, Any]) -> Section | None:
    rows = []
    for g in report["gates"]:
        ni = g.get("noninferiority")
        if ni:
            rows.append((g["artifact"], f"{ni['delta_auc']:+.4f} ({ni['delta_auc_ci'][0]:+.4f} to "
                         f"{ni['delta_auc_ci'][1]:+.4f})", f"{ni['delta_sensitivity']:+.4f} "
                         f"({ni['delta_sensitivity_ci'][0]:+.4f} to {ni['delta_sensitivity_ci'][1]:+.4f})"))
    if not rows:
        return None
    level = next((g["noninferiority"].get("level", 0.95) for g in report["gates"] if g.get("noninferiority")), 0.95)
    return Section(f"Non-inferiority (paired bootstrap, two-sided {level:.0%} CI)", [
        Table(("artifact", "ΔAUC (CI)", "Δsensitivity (CI)"), rows),
        Para("Differences are candidate minus reference on the same images; an interval that stays above the "
             "margin shows the int8 file is not worse by more than that margin."),
    ])


def export_section(report: dict[str, Any]) -> Section | None:
    if not report.get("export"):
        return None
    rows = [(name, str(e["n"]), f"{e['max_abs']:.2e}", f"{e['mean_abs']:.2e}", f"{e['top1_agreement']:.3f}",
             f"{e['decision_agreement']:.3f}", "PASS" if e["passed"] else "FAIL")
            for name, e in report["export"].items()]
    table = Table(("artifact", "images", "max |Δ| (logits)", "mean |Δ| (logits)", "top-1 agreement",
                   "decision agreement", "result"), rows)
    sources = [e["source"] for e in report["export"].values() if e.get("source")]
    if not sources:
        return Section("Export parity against PyTorch", [table])
    src = sources[0]
    return Section("Reference: the brought model file", [
        Para(f"The build started from the {src['format'].upper()} file {src['file']} (sha256 {src['sha256']}), "
             f"input {src['input']!r} {src['layout']}, no PyTorch. It ships unchanged as the fp32 artifact; the "
             "table compares the shipped copy with the original through the runtime backend."), table])


def _quant_item(name: str, q: dict[str, Any]) -> str:
    cfg = q["config"]
    if "full_integer" in q:  # TFLite (ai-edge-quantizer)
        return (f"{name}: {q['tool']}; calibration {cfg['calibration']}, I/O {q['io_dtype']['input']} -> "
                f"{q['io_dtype']['output']}, {q['n_calibration']} calibration images; "
                f"{'full-integer' if q['full_integer'] else 'NOT full-integer'}; int8 share of MACs "
                f"{q['int8_mac_fraction']:.1%}; integer ops {q['quantized_ops']}; float ops "
                f"{q['float_ops'] or 'none'}; float<->int conversions inside the graph {q['inner_conversions']}.")
    return (f"{name}: {q['tool']} ({q['format']}), calibrator {cfg['calibrator']}, per-channel "
            f"{cfg['per_channel']}, activations {cfg['activation_type']} / weights {cfg['weight_type']}, "
            f"{q['n_calibration']} calibration images; int8 share of MACs {q['int8_mac_fraction']:.1%}; quantized "
            f"ops {q['quantized_ops']}; float ops {q['float_ops']}; excluded nodes "
            f"{cfg['nodes_to_exclude'] or 'none'}.")


def quantization_section(report: dict[str, Any]) -> Section | None:
    if not report.get("quantization"):
        return None
    return Section("Quantization", [Bullets([_quant_item(n, q) for n, q in report["quantization"].items()])])


def artifacts_section(report: dict[str, Any]) -> Section | None:
    if not report.get("artifacts"):
        return None
    rows = [(a["id"], a["path"], f"{a['bytes'] / 1e6:.2f} MB", f"{fmt(a.get('mean_infer_ms'), 2)} ms")
            for a in report["artifacts"]]
    return Section("Files", [Table(("artifact", "file", "size", "mean inference, build machine, 1 image"), rows)])


def kept_name(k: dict[str, str]) -> str:
    """ "features.1.block.0.0 (Conv, node_Conv_510)"; TFLite scopes are too long to print whole."""
    if not k["where"]:
        return f"{k['node']} ({k['op_type']})"
    return f"{k['where']} ({k['op_type']}" + (f", {k['node']})" if len(k["node"]) <= 40 else ")")


def fallback_sections(report: dict[str, Any], figures: set[str]) -> list[Section]:
    out = []
    for q_name, q in (report.get("quantization") or {}).items():
        fb = q.get("fallback")
        if not fb:
            continue
        if fb["passed"] and not fb["excluded_nodes"]:
            out.append(Section(f"Accuracy-aware fallback ({q_name})",
                               [Para("Plain int8 passed the gate: no fallback was needed, nothing kept in float.")]))
            continue
        detail = fb.get("kept_in_float_detail") or [{"node": n, "op_type": op, "where": ""}
                                                    for n, op in fb["kept_in_float"].items()]
        blocks: list[Block] = [Para(
            f"{'Passed' if fb['passed'] else 'NO candidate passed'} with {len(fb['excluded_nodes'])} layer(s) "
            f"kept in float: {', '.join(kept_name(k) for k in detail) or 'none'}. int8 share of MACs "
            f"{fb['int8_mac_fraction']:.1%}.", "" if fb["passed"] else "warning")]
        if fb["mostly_float"]:
            blocks.append(Para("Most MACs run in fp32: this is not an int8 model in any useful sense.", "warning"))
        blocks.append(Table(("step", "layers in float", "ΔAUC", "Δsensitivity", "decision flips", "int8 MACs",
                             "gate"), [(str(st["step"]), str(len(st["excluded"])), f"{st['delta_auc']:+.4f}",
                                        f"{st['delta_sensitivity']:+.4f}", str(st["flips"]),
                                        f"{st['int8_mac_fraction']:.1%}", "PASS" if st["passed"] else "fail")
                                       for st in fb["steps"]]))
        if f"fallback-{q_name}" in figures:
            blocks.append(Figure(f"fallback-{q_name}", "Decision flips and int8 share of MACs per fallback step."))
        out.append(Section(f"Accuracy-aware fallback ({q_name})", blocks))
    return out


def layer_name(e: dict[str, Any]) -> str:
    """A layer by its module path when the report records one (``where``/``module``), else its tensor name."""
    return str(e.get("where") or e.get("module") or e["tensor"])


def layers_section(report: dict[str, Any], figures: set[str]) -> Section | None:
    if not report.get("layer_errors"):
        return None
    worst = sorted(report["layer_errors"], key=lambda e: e["snr_db"])[:10]
    paths = any(layer_name(e) != e["tensor"] for e in worst)
    rows = [((layer_name(e), e["tensor"]) if paths else (e["tensor"],)) + (e["op_type"], f"{e['snr_db']:.1f}",
            f"{e['cosine']:.5f}", f"{e['max_abs']:.4f}") for e in worst]
    blocks: list[Block] = [
        Para("The ten activations where int8 differs most from fp32 (ONNX int8 file, a few calibration images). "
             "SNR = signal-to-quantization-noise ratio in dB: higher is closer to fp32 (20 dB ≈ 10 % noise "
             "amplitude); max |Δ| is in the activation's own units."
             + ("" if paths else " Named by ONNX tensor: this report records no module paths for them.")),
        Table((("layer (module)", "tensor") if paths else ("tensor",)) + ("op", "SNR (dB)", "cosine similarity",
                                                                          "max |Δ| (activation units)"), rows)]
    if "layers" in figures:
        blocks.append(Figure("layers", "SNR of the 20 lowest-SNR activations (dB; higher is closer to fp32)."))
    return Section("Per-layer int8 error (lowest SNR first)", blocks)


def figure_sections(report: dict[str, Any], figures: set[str]) -> list[Section]:
    """The ROC and confusion figures, placed after the gate table."""
    blocks: list[Block] = []
    if "roc" in figures:
        blocks.append(Figure("roc", "ROC curves on the validation set (solid: reference; dashed/dotted: the other "
                                    "files); markers: each file's sensitivity and specificity at the locked "
                                    "threshold."))
    if "confusion" in figures:
        blocks.append(Figure("confusion", "Decisions at the locked threshold, per file (rows: truth; columns: "
                                          "decision)."))
    return [Section("Figures", blocks)] if blocks else []


def report_content(report: dict[str, Any]) -> tuple[Verdict, list[Section]]:
    figures = {Path(f).stem for f in report.get("figure_files") or []}
    sections: list[Section | None] = [gate_section(report), *figure_sections(report, figures),
                                      evidence_section(report), confusion_section(report),
                                      noninferiority_section(report),
                                      quality_section(report.get("quality")), export_section(report),
                                      quantization_section(report), *fallback_sections(report, figures),
                                      layers_section(report, figures), artifacts_section(report)]
    return verdict(report), [s for s in sections if s is not None]
