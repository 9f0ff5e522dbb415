"""``fundus-edge compare`` for segmentation bundles: every artifact's vessel maps on the same photos, each against
the reference (the fp32 file the threshold was locked on): per photo, the Dice of the two binary masks at the
bundle's threshold (working resolution, inside the FOV), the largest probability difference and the change of
each biomarker; with expert masks, also ΔAUC and ΔF1 of the pooled FOV pixels. Judged with the bundle's own
segmentation-gate criteria (per-photo mask Dice floor; ΔAUC and ΔF1 when masks are given).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle.read import Bundle
from ..datasets.masks import MaskedImage
from ..errors import UsageError
from ..runtime.backends import BackendSettings
from .segmentation import ArtifactEval, SegmentationCriteria, _biomarkers, dice, evaluate, pixel_metrics


@dataclass
class SegPair:
    """One candidate artifact against the reference, photo by photo."""

    candidate: str
    mask_dice: list[float]
    max_abs_prob: list[float]  # largest |p_candidate - p_reference| inside the FOV, per photo
    delta_density: list[float]
    delta_fractal_dimension: list[float]
    delta_auc: float | None = None  # with expert masks only
    delta_f1: float | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"candidate": self.candidate, "passed": self.passed, "failures": self.failures,
                "mask_dice": self.mask_dice, "min_mask_dice": min(self.mask_dice),
                "max_abs_prob": self.max_abs_prob, "delta_density": self.delta_density,
                "delta_fractal_dimension": self.delta_fractal_dimension, "delta_auc": self.delta_auc,
                "delta_f1": self.delta_f1}


def _pair(name: str, ref: ArtifactEval, cand: ArtifactEval, threshold: float, criteria: SegmentationCriteria,
          with_masks: bool) -> SegPair:
    dices = [dice(a >= threshold, b >= threshold) for a, b in zip(ref.maps, cand.maps, strict=True)]
    diffs = [float(np.max(np.abs(a.astype(np.float32) - b.astype(np.float32)), initial=0.0))
             for a, b in zip(ref.maps, cand.maps, strict=True)]
    rb, cb = _biomarkers(ref, threshold), _biomarkers(cand, threshold)
    pair = SegPair(name, dices, diffs, [b["density"] - a["density"] for a, b in zip(rb, cb, strict=True)],
                   [b["fractal_dimension"] - a["fractal_dimension"] for a, b in zip(rb, cb, strict=True)])
    if min(dices) < criteria.min_mask_dice:
        pair.failures.append(f"mask Dice {min(dices):.4f} < {criteria.min_mask_dice} on "
                             f"{sum(d < criteria.min_mask_dice for d in dices)} photo(s)")
    if with_masks:
        rm, cm = pixel_metrics(ref.pos, ref.neg, threshold), pixel_metrics(cand.pos, cand.neg, threshold)
        pair.delta_auc, pair.delta_f1 = cm["auc"] - rm["auc"], cm["f1"] - rm["f1"]
        if pair.delta_auc < criteria.min_delta_auc:
            pair.failures.append(f"ΔAUC {pair.delta_auc:+.4f} < {criteria.min_delta_auc}")
        if pair.delta_f1 < criteria.min_delta_f1:
            pair.failures.append(f"ΔF1 {pair.delta_f1:+.4f} < {criteria.min_delta_f1}")
    return pair


def bundle_criteria(bundle: Bundle) -> SegmentationCriteria:
    """The segmentation-gate criteria the bundle was built with (the defaults when it records none)."""
    crit = bundle.spec.gate.criteria if bundle.spec.gate is not None else {}
    known = SegmentationCriteria.__dataclass_fields__
    return SegmentationCriteria(**{k: v for k, v in crit.items() if k in known})


def compare_segmentation(bundle: Bundle, images: Sequence[MaskedImage | str | Path], ids: list[str] | None = None,
                         settings: BackendSettings | None = None) -> dict[str, Any]:
    """Every chosen artifact (default: all) on ``images`` against the reference; expert masks make ΔAUC/ΔF1."""
    assert bundle.spec.dense is not None
    reference = bundle.spec.operating_point.locked_on or bundle.artifacts[0].id
    chosen = list(dict.fromkeys([reference, *(ids or [a.id for a in bundle.artifacts])]))
    if len(chosen) < 2:
        raise UsageError(f"compare needs a candidate besides the reference {reference}; the bundle has "
                         f"{[a.id for a in bundle.artifacts]}")
    files: dict[str, Path | tuple[str, Path]] = {i: (bundle.artifact(i).format, bundle.path(bundle.artifact(i)))
                                                 for i in chosen}
    evals = evaluate(files, list(images), bundle.spec.dense, settings)
    with_masks = bool(images) and all(isinstance(i, MaskedImage) for i in images)
    threshold = float(bundle.operating_point.threshold)
    criteria = bundle_criteria(bundle)
    pairs = [_pair(k, evals[reference], evals[k], threshold, criteria, with_masks) for k in chosen[1:]]
    ref_metrics = pixel_metrics(evals[reference].pos, evals[reference].neg, threshold) if with_masks else None
    return {"task": "segmentation", "bundle_id": bundle.bundle_id, "reference": reference, "threshold": threshold,
            "criteria": criteria.to_dict(), "with_masks": with_masks,
            "images": [str(i.image if isinstance(i, MaskedImage) else i) for i in images],
            "reference_metrics": ref_metrics, "seconds": {k: e.seconds for k, e in evals.items()},
            "pairs": [p.to_dict() for p in pairs], "passed": all(p.passed for p in pairs)}


def compare_text(doc: dict[str, Any]) -> str:
    lines = [f"bundle {doc['bundle_id']}: {len(doc['images'])} photos, masks at threshold {doc['threshold']:.4f}, "
             f"each artifact against {doc['reference']}"]
    if doc["reference_metrics"]:
        m = doc["reference_metrics"]
        lines.append(f"  {doc['reference']} vs the expert masks: pixel AUC {m['auc']:.4f}, F1 {m['f1']:.4f}")
    for p in doc["pairs"]:
        extra = (f", ΔAUC {p['delta_auc']:+.4f}, ΔF1 {p['delta_f1']:+.4f}" if p["delta_auc"] is not None else "")
        lines.append(f"  {p['candidate']:<16} min mask Dice {p['min_mask_dice']:.4f}, max |Δp| "
                     f"{max(p['max_abs_prob']):.4f}, max |Δdensity| {max(map(abs, p['delta_density'])):.4f}, "
                     f"max |ΔFD| {max(map(abs, p['delta_fractal_dimension'])):.4f}{extra} -> "
                     + ("PASS" if p["passed"] else "FAIL: " + "; ".join(p["failures"])))
        for i, d in zip(doc["images"], p["mask_dice"], strict=True):
            lines.append(f"    {Path(i).name:<28} Dice {d:.4f}")
    lines.append("parity: PASSED" if doc["passed"] else "parity: FAILED")
    return "\n".join(lines)
