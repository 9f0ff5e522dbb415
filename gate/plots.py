"""Report figures (matplotlib, Agg): ROC per artifact, confusion matrices, per-layer error, fallback steps.

Each figure is drawn from a plain-data dict that is also written to report.json (``figures``), so the numbers
behind every picture can be checked.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from .metrics import confusion


def roc_points(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve (fpr, tpr, thresholds) at every distinct score, highest threshold first, starting at (0, 0)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    distinct = np.flatnonzero(np.diff(s_sorted)) if len(s_sorted) > 1 else np.array([], dtype=int)
    idx = np.concatenate([distinct, [len(s_sorted) - 1]])
    tps = np.cumsum(y_sorted)[idx]
    fps = (idx + 1) - tps
    tpr = np.concatenate([[0.0], tps / max(y.sum(), 1)])
    fpr = np.concatenate([[0.0], fps / max((~y).sum(), 1)])
    thr = np.concatenate([[np.inf], s_sorted[idx]])
    return fpr, tpr, thr


def figure_data(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers each figure shows, derived from the report's scores/labels and tables."""
    y = np.asarray(report["labels"])
    t = report["operating_point"]["threshold"]
    roc: dict[str, Any] = {}
    conf: dict[str, Any] = {}
    for name, s in report["scores"].items():
        fpr, tpr, _ = roc_points(y, np.asarray(s))
        c = confusion(y, np.asarray(s), t)
        pos, neg = c["tp"] + c["fn"], c["fp"] + c["tn"]
        roc[name] = {"fpr": fpr.round(6).tolist(), "tpr": tpr.round(6).tolist(),
                     "operating_point": {"fpr": c["fp"] / neg if neg else 0.0, "tpr": c["tp"] / pos if pos else 0.0}}
        conf[name] = c
    layers = sorted(report.get("layer_errors", []), key=lambda e: e["snr_db"])[:20]
    fallback: dict[str, list[dict[str, Any]]] = {}
    for q_name, q in (report.get("quantization") or {}).items():
        steps = (q.get("fallback") or {}).get("steps") or []
        if len(steps) > 1:  # a fallback ran (step 0 alone is plain int8)
            fallback[q_name] = [{"step": s["step"], "flips": s["flips"], "int8_mac_fraction": s["int8_mac_fraction"],
                                 "passed": s["passed"]} for s in steps]
    return {"roc": roc, "confusion": conf,
            "layers": [{"tensor": e["tensor"], "name": str(e.get("where") or e.get("module") or e["tensor"]),
                        "op_type": e.get("op_type", ""), "snr_db": e["snr_db"]} for e in layers],
            "fallback": fallback}


LINE_STYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P")
COLOURS = ("#1f2328", "#0969da", "#cf222e", "#8250df", "#bc4c00", "#1a7f37")


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _roc_axes(ax: Any, roc: dict[str, Any], op: dict[str, Any], legend: bool) -> None:
    for i, (name, r) in enumerate(roc.items()):
        ref = name == op.get("locked_on")
        colour = COLOURS[i % len(COLOURS)]
        auc = float(np.trapezoid(r["tpr"], r["fpr"]))
        ax.plot(r["fpr"], r["tpr"], ls="-" if ref else LINE_STYLES[1 + (i % 3)], color=colour,
                lw=3.2 if ref else 1.8, alpha=0.5 if ref else 1.0,
                label=f"{name}{' (reference)' if ref else ''}: AUC {auc:.3f}")
        p = r.get("operating_point")
        if p:
            ax.plot([p["fpr"]], [p["tpr"]], MARKERS[i % len(MARKERS)], ms=12 if ref else 8, mfc="none", mew=2,
                    color=colour, label=f"{name} at the operating point")
    ax.grid(True, color="0.92")
    ax.set_xlabel("1 − specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    if legend:
        ax.legend(loc="lower right", fontsize=8, framealpha=0.95)


def _roc(plt: Any, roc: dict[str, Any], op: dict[str, Any]) -> bytes:
    """Full ROC (left) and a zoom around the operating points (right), where int8 and fp32 differ if at all."""
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(11.5, 5.2))
    ax.plot([0, 1], [0, 1], color="0.85", lw=0.8, label="chance")
    _roc_axes(ax, roc, op, legend=True)
    ax.set_xlim(-0.01, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_title("ROC on the validation set", fontsize=10)
    _roc_axes(zoom, roc, op, legend=False)
    pts = [r["operating_point"] for r in roc.values() if r.get("operating_point")]
    if pts:
        fx, ty = [p["fpr"] for p in pts], [p["tpr"] for p in pts]
        zoom.set_xlim(max(min(fx) - 0.12, -0.01), min(max(fx) + 0.12, 1.0))
        zoom.set_ylim(max(min(ty) - 0.12, 0.0), min(max(ty) + 0.06, 1.01))
    zoom.set_title(f"Zoom on the operating points: threshold {op['threshold']:.3f} ({op['rule']})", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _confusion(plt: Any, conf: dict[str, Any], op: dict[str, Any]) -> bytes:
    names = list(conf)
    cols = min(len(names), 2)
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.7 * rows), squeeze=False)
    for ax in axes.ravel()[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names, strict=False):
        c = conf[name]
        m = np.array([[c["tp"], c["fn"]], [c["fp"], c["tn"]]])
        ax.imshow(m, cmap="Blues", vmin=0, vmax=max(int(m.max()), 1) * 1.6)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v}\n{('TP', 'FN', 'FP', 'TN')[2 * i + j]}", ha="center", va="center", fontsize=14)
        ax.set_xticks([0, 1], ["referred", "not referred"], fontsize=10)
        ax.set_yticks([0, 1], ["referable", "not\nreferable"], fontsize=10)
        ax.set_xlabel("decision", fontsize=10)
        ax.set_ylabel("truth", fontsize=10)
        ax.set_title(name, fontsize=11)
    fig.suptitle(f"Decisions at threshold {op['threshold']:.3f} ({op['rule']})", fontsize=11)
    fig.tight_layout()
    return _png(fig)


def _layers(plt: Any, layers: list[dict[str, Any]]) -> bytes:
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(layers) + 1.2))
    labels = [f"{e['name'][-44:]} ({e['op_type']})" if e.get("op_type") else e["name"][-44:] for e in layers]
    ax.barh(labels, [e["snr_db"] for e in layers], color="#c0504d")
    ax.invert_yaxis()
    ax.set_xlabel("SNR, fp32 vs int8 activations (dB; higher = closer to fp32)")
    ax.set_ylabel("layer (lowest SNR first)")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(True, axis="x", color="0.9")
    return _png(fig)


def _fallback(plt: Any, name: str, steps: list[dict[str, Any]]) -> bytes:
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    x = [s["step"] for s in steps]
    flips = [s["flips"] for s in steps]
    ax.plot(x, flips, "o-", color="#0969da", label="decision flips")
    ax.set_xticks(x)
    ax.set_ylim(-0.5, max(flips) + 1.5)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("fallback step (layers kept in float)")
    ax.set_ylabel("decision flips (images)")
    ax2 = ax.twinx()
    ax2.plot(x, [100 * s["int8_mac_fraction"] for s in steps], "s--", color="gray", label="int8 MACs")
    ax2.set_ylabel("int8 share of MACs (%)")
    ax.legend(ax.get_lines() + ax2.get_lines(), ["decision flips (left)", "int8 MACs, % (right)"], fontsize=8,
              loc="upper right")
    ax.set_title(f"Accuracy-aware fallback ({name})", fontsize=10)
    return _png(fig)


def render_pngs(data: dict[str, Any], operating_point: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes per figure name; only figures of what ran (no fallback figure when no fallback ran)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {"roc": _roc(plt, data["roc"], operating_point), "confusion": _confusion(plt, data["confusion"],
                                                                                   operating_point)}
    if data["layers"]:
        out["layers"] = _layers(plt, data["layers"])
    for name, steps in (data.get("fallback") or {}).items():
        out[f"fallback-{name}"] = _fallback(plt, name, steps)
    return out
