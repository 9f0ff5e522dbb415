"""Build / check reports: ``report.json`` (numbers) and ``report.md`` (one screen for a clinician-engineer)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from .quality_gate import render_quality_markdown


def _kept_name(k: dict[str, str]) -> str:
    """ "features.1.block.0.0 (Conv, node_Conv_510)"; TFLite scopes are too long to print whole."""
    if not k["where"]:
        return f"{k['node']} ({k['op_type']})"
    return f"{k['where']} ({k['op_type']}" + (f", {k['node']})" if len(k["node"]) <= 40 else ")")


def _f(v: Any, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def _header(report: dict[str, Any]) -> list[str]:
    """Verdict, validation set, operating point and the gate table."""
    lines = [f"# fundus-edge report: {report.get('name', 'bundle')}", ""]
    verdict = "PASSED" if report["gate_passed"] else "FAILED"
    lines += [f"**Clinical gate: {verdict}**" + ("" if report["gate_passed"] else
              " — " + "; ".join(f for g in report["gates"] for f in g["failures"])), ""]
    ref = report["reference"]
    op = report["operating_point"]
    lines += [
        f"Validation set: {ref['n']} images, {ref['prevalence']:.1%} referable "
        f"({report['validation'].get('layout', '?')} labels; {len(report['validation'].get('problems', []))} "
        "rows skipped).",
        f"Operating point locked on {op['locked_on']}: threshold {op['threshold']:.4f} ({op['rule']}).",
        "",
        "| artifact | AUC (95 % CI) | sensitivity | specificity | ΔAUC | Δsens | flips | gate |",
        "|---|---|---|---|---|---|---|---|",
        f"| {ref['name']} (reference) | {ref['auc']:.4f} ({ref['auc_ci'][0]:.3f}-{ref['auc_ci'][1]:.3f}) | "
        f"{ref['sensitivity']:.4f} | {ref['specificity']:.4f} | - | - | - | reference |",
    ]
    for g in report["gates"]:
        lines.append(
            f"| {g['artifact']} | {g['auc']:.4f} ({g['auc_ci'][0]:.3f}-{g['auc_ci'][1]:.3f}) | "
            f"{g['sensitivity']:.4f} | {g['specificity']:.4f} | {g['delta_auc']:+.4f} | "
            f"{g['delta_sensitivity']:+.4f} | {g['flips']} ({g['flip_rate']:.1%}) | "
            f"{'PASS' if g['passed'] else 'FAIL'} |"
        )
    crit = report["criteria"]
    lines += ["", f"Gate criteria: ΔAUC ≥ {crit['min_delta_auc']}, Δsensitivity ≥ {crit['min_delta_sensitivity']}, "
              f"flips ≤ {crit['max_flip_rate']:.1%}. AUC CIs: percentile bootstrap, {crit['n_boot']} resamples, "
              f"seed {crit['seed']}.", ""]
    return lines


def _confusion(report: dict[str, Any]) -> list[str]:
    """Confusion counts at the operating point."""
    lines: list[str] = []
    if not report.get("confusion"):
        return []
    lines += ["## Confusion at the operating point", "", "| artifact | TP | FN | FP | TN |",
              "|---|---|---|---|---|"]
    for name, c in report["confusion"].items():
        lines.append(f"| {name} | {c['tp']} | {c['fn']} | {c['fp']} | {c['tn']} |")
    lines.append("")
    return lines


def _export(report: dict[str, Any]) -> list[str]:
    """Export parity of every artifact against PyTorch."""
    lines: list[str] = []
    if not report.get("export"):
        return []
    lines += ["## Export parity vs PyTorch", "",
              "| artifact | n | max abs | mean abs | top-1 | decision | result |", "|---|---|---|---|---|---|---|"]
    for name, e in report["export"].items():
        lines.append(f"| {name} | {e['n']} | {e['max_abs']:.2e} | {e['mean_abs']:.2e} | "
                     f"{e['top1_agreement']:.3f} | {e['decision_agreement']:.3f} | "
                     f"{'PASS' if e['passed'] else 'FAIL'} |")
    lines.append("")
    return lines


def _quantization(report: dict[str, Any]) -> list[str]:
    """How each int8 artifact was quantized."""
    lines: list[str] = []
    if not report.get("quantization"):
        return []
    lines += ["## Quantization", ""]
    for name, q in report["quantization"].items():
        cfg = q["config"]
        if "full_integer" in q:  # TFLite (ai-edge-quantizer)
            lines.append(
                f"- **{name}**: {q['tool']}; calibration {cfg['calibration']}, I/O {q['io_dtype']['input']} -> "
                f"{q['io_dtype']['output']}, {q['n_calibration']} calibration images; "
                f"{'full-integer' if q['full_integer'] else '**NOT full-integer**'}; int8 MAC share "
                f"{q['int8_mac_fraction']:.1%}; integer ops {q['quantized_ops']}; float ops "
                f"{q['float_ops'] or 'none'}; float<->int conversions inside the graph {q['inner_conversions']}."
            )
            continue
        lines.append(
            f"- **{name}**: {q['tool']} ({q['format']}), calibrator {cfg['calibrator']}, "
            f"per-channel {cfg['per_channel']}, activations {cfg['activation_type']} / weights "
            f"{cfg['weight_type']}, {q['n_calibration']} calibration images; int8 MAC share "
            f"{q['int8_mac_fraction']:.1%}; quantized ops {q['quantized_ops']}; float ops {q['float_ops']}; "
            f"excluded nodes {cfg['nodes_to_exclude'] or 'none'}."
        )
    lines.append("")
    return lines


def _artifacts(report: dict[str, Any]) -> list[str]:
    """Files, sizes and latency on the build machine."""
    lines: list[str] = []
    if not report.get("artifacts"):
        return []
    lines += ["## Artifacts", "", "| artifact | file | size | mean latency (this machine, 1 image) |",
              "|---|---|---|---|"]
    for a in report["artifacts"]:
        lat = a.get("mean_infer_ms")
        lines.append(f"| {a['id']} | {a['path']} | {a['bytes'] / 1e6:.2f} MB | {_f(lat, 2)} ms |")
    lines.append("")
    return lines


def _fallbacks(report: dict[str, Any]) -> list[str]:
    """What the accuracy-aware fallback kept in float, step by step."""
    lines: list[str] = []
    for q_name, q in (report.get("quantization") or {}).items():
        fb = q.get("fallback")
        if not fb:
            continue
        lines += [f"## Accuracy-aware fallback ({q_name})", ""]
        if fb["passed"] and not fb["excluded_nodes"]:
            lines.append("Plain int8 passed the gate: nothing kept in float.")
        else:
            detail = fb.get("kept_in_float_detail") or [{"node": n, "op_type": op, "where": ""}
                                                        for n, op in fb["kept_in_float"].items()]
            kept = ", ".join(_kept_name(k) for k in detail) or "none"
            lines.append(f"{'Passed' if fb['passed'] else 'NO candidate passed'} with "
                         f"{len(fb['excluded_nodes'])} node(s) kept in float: {kept}. "
                         f"int8 MAC share {fb['int8_mac_fraction']:.1%}.")
        if fb["mostly_float"]:
            lines.append("**WARNING: most MACs run in fp32. This is not an int8 model in any useful sense.**")
        lines += ["", "| step | nodes in float | ΔAUC | Δsens | flips | int8 MACs | gate |",
                  "|---|---|---|---|---|---|---|"]
        for st in fb["steps"]:
            lines.append(f"| {st['step']} | {len(st['excluded'])} | {st['delta_auc']:+.4f} | "
                         f"{st['delta_sensitivity']:+.4f} | {st['flips']} | {st['int8_mac_fraction']:.1%} | "
                         f"{'PASS' if st['passed'] else 'fail'} |")
        lines.append("")
    return lines


def _noninferiority(report: dict[str, Any]) -> list[str]:
    """Paired-bootstrap confidence intervals of the deltas."""
    lines: list[str] = []
    ni_rows = [g for g in report["gates"] if g.get("noninferiority")]
    if ni_rows:
        lines += ["## Non-inferiority (paired bootstrap, 95 % CI)", "", "| artifact | ΔAUC (CI) | Δsensitivity (CI) |",
                  "|---|---|---|"]
        for g in ni_rows:
            ni = g["noninferiority"]
            lines.append(f"| {g['artifact']} | {ni['delta_auc']:+.4f} ({ni['delta_auc_ci'][0]:+.4f}, "
                         f"{ni['delta_auc_ci'][1]:+.4f}) | {ni['delta_sensitivity']:+.4f} "
                         f"({ni['delta_sensitivity_ci'][0]:+.4f}, {ni['delta_sensitivity_ci'][1]:+.4f}) |")
        lines.append("")
    return lines


def _layer_errors(report: dict[str, Any]) -> list[str]:
    """The ten layers with the lowest int8 SNR."""
    lines: list[str] = []
    if not report.get("layer_errors"):
        return []
    worst = sorted(report["layer_errors"], key=lambda e: e["snr_db"])[:10]
    lines += ["## Per-layer int8 error (lowest SNR first)", "", "| tensor | op | SNR dB | cosine | max abs |",
              "|---|---|---|---|---|"]
    for e in worst:
        lines.append(f"| {e['tensor']} | {e['op_type']} | {e['snr_db']:.2f} | {e['cosine']:.5f} | "
                     f"{e['max_abs']:.4f} |")
    lines.append("")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    lines = _header(report) + render_quality_markdown(report.get("quality"))
    for section in (_confusion, _export, _quantization, _artifacts, _fallbacks, _noninferiority, _layer_errors):
        lines += section(report)
    if report.get("figure_files"):
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in report["figure_files"]] + [""]
    lines += ["Synthetic validation data (if used) tests the pipeline only and supports no clinical claim.", ""]
    return "\n".join(lines)


def render_html(report: dict[str, Any], pngs: dict[str, bytes]) -> str:
    """A self-contained page: the markdown report as preformatted text plus every figure inline."""
    md = html.escape(render_markdown({**report, "figure_files": []}))
    imgs = "\n".join(
        f'<figure><img alt="{name}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"<figcaption>{name}</figcaption></figure>" for name, data in pngs.items())
    verdict = "PASSED" if report["gate_passed"] else "FAILED"
    colour = "#1a7f37" if report["gate_passed"] else "#cf222e"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>fundus-edge report: {html.escape(str(report.get("name")))}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:1.5em auto;padding:0 1em}}
pre{{white-space:pre-wrap;font-size:13px;background:#f6f8fa;padding:1em}}
.figs{{display:flex;flex-wrap:wrap;gap:1em}} figure{{margin:0}} img{{max-width:520px}}
.verdict{{font-size:1.4em;font-weight:600;color:{colour}}}</style></head>
<body><p class="verdict">Clinical gate: {verdict}</p>
<div class="figs">{imgs}</div>
<pre>{md}</pre></body></html>
"""


def write_reports(folder: Path, report: dict[str, Any], figures: bool = True) -> list[Path]:
    """report.json, report.md and (with matplotlib) figures/*.png + a self-contained report.html."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    pngs: dict[str, bytes] = {}
    if figures and "scores" in report:
        from .plots import figure_data, render_pngs

        report = {**report, "figures": figure_data(report)}
        pngs = render_pngs(report["figures"], report["operating_point"]["rule"])
        (folder / "figures").mkdir(exist_ok=True)
        report["figure_files"] = []
        for name, data in pngs.items():
            p = folder / "figures" / f"{name}.png"
            p.write_bytes(data)
            written.append(p)
            report["figure_files"].append(f"figures/{name}.png")
        h = folder / "report.html"
        h.write_text(render_html(report, pngs))
        written.append(h)
    j = folder / "report.json"
    j.write_text(json.dumps(report, indent=2) + "\n")
    m = folder / "report.md"
    m.write_text(render_markdown(report))
    return [j, m, *written]
