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
        roc[name] = {"fpr": fpr.round(6).tolist(), "tpr": tpr.round(6).tolist()}
        conf[name] = confusion(y, np.asarray(s), t)
    layers = sorted(report.get("layer_errors", []), key=lambda e: e["snr_db"])[:20]
    steps: list[dict[str, Any]] = []
    for q in report.get("quantization", {}).values():
        steps = q.get("fallback", {}).get("steps", []) if q.get("fallback") else steps
    return {"roc": roc, "confusion": conf,
            "layers": [{"tensor": e["tensor"], "snr_db": e["snr_db"]} for e in layers],
            "fallback": [{"step": s["step"], "flips": s["flips"], "int8_mac_fraction": s["int8_mac_fraction"],
                          "passed": s["passed"]} for s in steps]}


def render_pngs(data: dict[str, Any], threshold_label: str) -> dict[str, bytes]:
    """PNG bytes per figure name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, bytes] = {}

    def save(fig: Any, name: str) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        out[name] = buf.getvalue()

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for name, r in data["roc"].items():
        ax.plot(r["fpr"], r["tpr"], label=name, lw=1.6, ls="--" if "int8" in name else "-")
    ax.plot([0, 1], [0, 1], color="0.8", lw=0.8)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC on the validation set")
    ax.legend(loc="lower right", fontsize=8)
    save(fig, "roc")

    names = list(data["confusion"])
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        c = data["confusion"][name]
        m = np.array([[c["tp"], c["fn"]], [c["fp"], c["tn"]]])
        ax.imshow(m, cmap="Blues")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=11)
        ax.set_xticks([0, 1], ["refer", "no-refer"])
        ax.set_yticks([0, 1], ["referable", "not ref."])
        ax.set_title(name, fontsize=9)
    fig.suptitle(f"Confusion at the locked threshold ({threshold_label})", fontsize=9)
    save(fig, "confusion")

    if data["layers"]:
        fig, ax = plt.subplots(figsize=(6.0, 0.25 * len(data["layers"]) + 1.0))
        ax.barh([e["tensor"][:32] for e in data["layers"]], [e["snr_db"] for e in data["layers"]], color="#c0504d")
        ax.invert_yaxis()
        ax.set_xlabel("SNR fp32 vs int8 (dB), lowest first")
        ax.tick_params(axis="y", labelsize=7)
        save(fig, "layers")

    if data["fallback"]:
        fig, ax = plt.subplots(figsize=(5.0, 3.0))
        steps = [s["step"] for s in data["fallback"]]
        ax.plot(steps, [s["flips"] for s in data["fallback"]], "o-", label="decision flips")
        ax.set_xticks(steps)
        ax.set_xlabel("fallback step (nodes kept in float)")
        ax.set_ylabel("flips")
        ax2 = ax.twinx()
        ax2.plot(steps, [100 * s["int8_mac_fraction"] for s in data["fallback"]], "s--", color="gray")
        ax2.set_ylabel("int8 MACs (%)")
        ax.set_title("Accuracy-aware fallback")
        save(fig, "fallback")
    return out
