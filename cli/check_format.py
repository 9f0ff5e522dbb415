"""The text ``fundus-edge check`` prints for people (library code returns a :class:`CheckResult`)."""

from __future__ import annotations

from typing import Any

from ..pipeline.check import CheckResult


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _quality_lines(quality: dict[str, Any], n: int) -> list[str]:
    lines = [f"  image quality: {quality['n_ungradable']}/{n} ungradable ({quality['ungradable_rate']:.1%})"
             + (f" - failed: {quality['failed_measures']}" if quality["failed_measures"] else "")]
    for k, e in quality["gradable"].items():
        pol = quality["ungradable_as_refer"][k]
        lines.append(f"  {k:<11} gradable only: n {e['n']}, sensitivity {_f(e.get('sensitivity'))}, specificity "
                     f"{_f(e.get('specificity'))}; ungradable = refer: sensitivity {_f(pol['sensitivity'])}, "
                     f"specificity {_f(pol['specificity'])}")
    if quality.get("note"):
        lines.append(f"  note: {quality['note']}")
    return lines


def format_check(result: CheckResult) -> str:
    """What ``check`` prints: each artifact's metrics at the locked threshold, each gate, the quality summary."""
    r = result
    lines = [f"bundle {r.bundle_id}: {r.n} images ({r.n_referable} referable) from {r.source}; "
             f"threshold {r.threshold:.4f} locked at build ({r.rule})"]
    lines += [f"  {k:<11} not checked: {msg}" for k, msg in r.skipped.items()]
    if r.note:
        lines.append(f"  note: {r.note}")
    for k, e in r.evaluations.items():
        lines.append(f"  {k:<11} AUC {e.auc:.4f} ({e.auc_ci[0]:.3f}-{e.auc_ci[1]:.3f})  sensitivity "
                     f"{e.sensitivity:.4f}  specificity {e.specificity:.4f}")
    for g in r.gates:
        lines.append(f"  gate {g.artifact} vs {g.reference}: ΔAUC {g.delta_auc:+.4f}, Δsens "
                     f"{g.delta_sensitivity:+.4f}, Δspec {g.delta_specificity:+.4f}, flips {g.flips} -> {g.verdict}")
        lines += [f"    FAIL: {m}" for m in g.failures] + [f"    not shown: {m}" for m in g.insufficient]
        if g.evidence is not None:
            ev = g.evidence
            lines.append(f"    flips inside the fp32 uncertainty band ({ev.band[0]:.4f}-{ev.band[1]:.4f}): "
                         f"{ev.flips_in_band}, outside: {ev.flips_outside_band}; bounds one-sided {ev.confidence:.0%}")
    for d in r.drift:
        est = "-" if d.estimate is None else f"{d.estimate:.4f}"
        lines.append(f"  operating point {d.artifact:<11} {d.metric} {est} (95% CI {d.ci[0]:.3f}-{d.ci[1]:.3f}, "
                     f"n {d.n}) vs target {d.target:.4f} -> {d.status}")
    if not r.gated:
        lines.append(f"  no {r.reference} artifact in this bundle: absolute metrics only, no relative gate")
    if r.quality is not None:
        lines += _quality_lines(r.quality, r.n)
    if r.device is not None:
        from ..pipeline.device_gate import device_lines

        lines += device_lines(r.device)
    if r.stability is not None:
        from ..quantization.stability import stability_lines

        lines += stability_lines(r.stability)
    lines.append(f"check: {r.verdict}" + ("; operating point DRIFT (see above)" if r.drifted else ""))
    return "\n".join(lines)
