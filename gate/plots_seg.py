"""Figures of a segmentation build's report (matplotlib, Agg): the pixel ROC of every artifact (FOV pixels against
the expert masks, pooled), the per-photo Dice between the reference's and each candidate's binary masks with
the gate's floor, and the per-photo change of vessel density and fractal dimension.

Each figure is drawn from plain data that is also in report.json (``figures``), so every picture can be checked.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

ROC_POINTS = 200  # thresholds per ROC curve kept for the report (of the gate's 65536 histogram bins)


def roc_from_histograms(pos: np.ndarray, neg: np.ndarray, points: int = ROC_POINTS) -> dict[str, list[float]]:
    """(fpr, tpr) at ``points`` thresholds evenly spaced in probability, from the gate's pooled histograms."""
    cpos, cneg = np.cumsum(pos[::-1])[::-1], np.cumsum(neg[::-1])[::-1]  # pixels >= each bin
    idx = np.unique(np.linspace(0, len(pos) - 1, points).astype(int))
    tpr = np.concatenate([cpos[idx] / max(int(pos.sum()), 1), [0.0]])
    fpr = np.concatenate([cneg[idx] / max(int(neg.sum()), 1), [0.0]])
    return {"fpr": [round(float(v), 6) for v in fpr], "tpr": [round(float(v), 6) for v in tpr]}


def seg_figure_data(gate: dict[str, Any], roc: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """The numbers each figure shows: ROC points per artifact; per candidate its mask Dice and biomarker change."""
    return {"roc": roc, "auc": {k: a["auc"] for k, a in gate["artifacts"].items()},
            "threshold": gate["threshold"], "min_mask_dice": gate["criteria"]["min_mask_dice"],
            "mask_dice": {g["artifact"]: g["mask_dice"] for g in gate["gates"]},
            "delta_density": {g["artifact"]: g["delta_density"] for g in gate["gates"]},
            "delta_fractal_dimension": {g["artifact"]: g["delta_fractal_dimension"] for g in gate["gates"]}}


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _roc(plt: Any, data: dict[str, Any]) -> bytes:
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    for name, pts in data["roc"].items():
        ax.plot(pts["fpr"], pts["tpr"], lw=1.3, label=f"{name} (AUC {data['auc'][name]:.4f})")
    ax.plot([0, 1], [0, 1], color="0.8", lw=0.8, ls="--")
    ax.set(xlabel="1 - specificity (FOV background pixels)", ylabel="sensitivity (vessel pixels)",
           title="pixel ROC inside the FOV, pooled over the photos", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out = _png(fig)
    plt.close(fig)
    return out


def _per_photo(plt: Any, data: dict[str, Any]) -> bytes:
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    names = list(data["mask_dice"])
    n = len(next(iter(data["mask_dice"].values()), []))
    width = 0.8 / max(len(names), 1)
    x = np.arange(n)
    panels = (("mask_dice", "Dice of the binary masks vs the reference"),
              ("delta_density", "Δ vessel density vs the reference"),
              ("delta_fractal_dimension", "Δ fractal dimension vs the reference"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, name in enumerate(names):
            ax.bar(x + i * width, data[key][name], width, label=name)
        ax.set(title=title, xlabel="validation photo")
        ax.set_xticks(x + width * (len(names) - 1) / 2, [str(i + 1) for i in range(n)])
    axes[0].axhline(data["min_mask_dice"], color="crimson", lw=1, ls="--", label="gate floor")
    low = min([data["min_mask_dice"], *(v for vs in data["mask_dice"].values() for v in vs)])
    axes[0].set_ylim(max(0.0, low - 0.02), 1.0)
    axes[0].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    out = _png(fig)
    plt.close(fig)
    return out


def render_seg_pngs(data: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes per figure name: ``seg-roc`` and (when there are candidates) ``seg-per-photo``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {"seg-roc": _roc(plt, data)}
    if data["mask_dice"]:
        out["seg-per-photo"] = _per_photo(plt, data)
    return out
