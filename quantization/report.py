"""Build / check reports: ``report.json`` (numbers) and ``report.md`` (one screen for a clinician-engineer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _f(v: Any, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def render_markdown(report: dict[str, Any]) -> str:
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
    if report.get("confusion"):
        lines += ["## Confusion at the operating point", "", "| artifact | TP | FN | FP | TN |",
                  "|---|---|---|---|---|"]
        for name, c in report["confusion"].items():
            lines.append(f"| {name} | {c['tp']} | {c['fn']} | {c['fp']} | {c['tn']} |")
        lines.append("")
    if report.get("export"):
        lines += ["## Export parity vs PyTorch", "",
                  "| artifact | n | max abs | mean abs | top-1 | decision | result |", "|---|---|---|---|---|---|---|"]
        for name, e in report["export"].items():
            lines.append(f"| {name} | {e['n']} | {e['max_abs']:.2e} | {e['mean_abs']:.2e} | "
                         f"{e['top1_agreement']:.3f} | {e['decision_agreement']:.3f} | "
                         f"{'PASS' if e['passed'] else 'FAIL'} |")
        lines.append("")
    if report.get("quantization"):
        lines += ["## Quantization", ""]
        for name, q in report["quantization"].items():
            cfg = q["config"]
            lines.append(
                f"- **{name}**: {q['tool']} ({q['format']}), calibrator {cfg['calibrator']}, "
                f"per-channel {cfg['per_channel']}, activations {cfg['activation_type']} / weights "
                f"{cfg['weight_type']}, {q['n_calibration']} calibration images; int8 MAC share "
                f"{q['int8_mac_fraction']:.1%}; quantized ops {q['quantized_ops']}; float ops {q['float_ops']}; "
                f"excluded nodes {cfg['nodes_to_exclude'] or 'none'}."
            )
        lines.append("")
    if report.get("artifacts"):
        lines += ["## Artifacts", "", "| artifact | file | size | mean latency (this machine, 1 image) |",
                  "|---|---|---|---|"]
        for a in report["artifacts"]:
            lat = a.get("mean_infer_ms")
            lines.append(f"| {a['id']} | {a['path']} | {a['bytes'] / 1e6:.2f} MB | {_f(lat, 2)} ms |")
        lines.append("")
    lines += ["Synthetic validation data (if used) tests the pipeline only and supports no clinical claim.", ""]
    return "\n".join(lines)


def write_reports(folder: Path, report: dict[str, Any]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    j = folder / "report.json"
    j.write_text(json.dumps(report, indent=2) + "\n")
    m = folder / "report.md"
    m.write_text(render_markdown(report))
    return [j, m]
