"""The segmentation gate, on the shipped files through the runtime: per validation photo, its tiles run through
each artifact's backend and are stitched (runtime/segment.py), then pixel AUC and F1 (Dice) inside the FOV
against the expert masks (pooled over the photos, at the photos' own resolution), sensitivity / specificity at the
locked threshold, and each candidate against the reference: ΔAUC, ΔF1, per-photo Dice between the two binary
masks (at the working resolution) and the change of each biomarker.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..datasets.masks import MaskedImage
from ..runtime.backends import BackendSettings, create_backend
from ..runtime.biomarkers import vessel_biomarkers
from ..runtime.dense import DensePreprocessSpec, prepare, to_original
from ..runtime.segment import vessel_probabilities

BINS = 65536


@dataclass(frozen=True)
class SegmentationCriteria:
    min_delta_auc: float = -0.002
    min_delta_f1: float = -0.005
    min_mask_dice: float = 0.97  # every photo's fp32-vs-candidate mask Dice

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ArtifactEval:
    """Pooled FOV-pixel histograms of one artifact, and its working-resolution maps per photo."""

    pos: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    neg: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    maps: list[np.ndarray] = field(default_factory=list)  # float16 (h, w) per photo
    fovs: list[np.ndarray] = field(default_factory=list)  # the working-resolution FOV per photo
    seconds: float = 0.0


def _mask(path: Path, size: tuple[int, int]) -> np.ndarray:
    with Image.open(path) as im:
        g = im.convert("L")
        if g.size != size:
            g = g.resize(size, Image.Resampling.NEAREST)
        return np.asarray(g) > 127


def pixel_metrics(pos: np.ndarray, neg: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """AUC (ties within a bin count half), and F1 / sensitivity / specificity at ``threshold`` (None: max F1)."""
    cpos, cneg = np.cumsum(pos[::-1])[::-1], np.cumsum(neg[::-1])[::-1]
    npos, nneg = int(pos.sum()), int(neg.sum())
    if not npos or not nneg:
        raise ValueError("the validation masks need vessel and background pixels inside the FOV")
    auc = float(((nneg - cneg + 0.5 * neg) * pos).sum() / (npos * nneg))
    i = int(np.argmax(2 * cpos / np.maximum(cpos + cneg + npos, 1))) if threshold is None \
        else min(int(np.ceil(threshold * BINS)), BINS - 1)
    tp, fp = int(cpos[i]), int(cneg[i])
    return {"auc": auc, "f1": 2 * tp / (tp + fp + npos), "sensitivity": tp / npos, "specificity": 1 - fp / nneg,
            "threshold": i / BINS, "pixels": npos + nneg, "vessel_fraction": npos / (npos + nneg)}


def evaluate(artifacts: dict[str, Path | tuple[str, Path]], images: Sequence[MaskedImage | str | Path],
             dense: DensePreprocessSpec, settings: BackendSettings | None = None) -> dict[str, ArtifactEval]:
    """Run every photo through every artifact by the runtime's backends (a bare path: an ONNX file; else
    (format, path)). Photos given without an expert mask (a bare path) add to the maps, not to the histograms."""
    import time

    backends = {k: create_backend(*(p if isinstance(p, tuple) else ("onnx", p)), settings)
                for k, p in artifacts.items()}
    evals = {k: ArtifactEval() for k in artifacts}
    try:
        for b in backends.values():
            b.activate()
        for img in images:
            src, gt_path, fov_path = (img.image, img.mask, img.fov) if isinstance(img, MaskedImage) \
                else (Path(img), None, None)
            d = prepare(src, dense)
            fov = _mask(fov_path, d.geometry.original_size) if fov_path else d.geometry.original_fov_mask()
            gt = _mask(gt_path, d.geometry.original_size) if gt_path else None
            for k, b in backends.items():
                t0 = time.perf_counter()
                work = vessel_probabilities(b, d, dense)
                evals[k].seconds += time.perf_counter() - t0
                evals[k].maps.append(np.where(d.fov_mask, work, 0).astype(np.float16))
                evals[k].fovs.append(d.fov_mask)
                if gt is None:
                    continue
                prob = to_original(work, d.geometry)
                bins = np.minimum((prob * BINS).astype(np.int64), BINS - 1)
                evals[k].pos += np.bincount(bins[fov & gt], minlength=BINS)
                evals[k].neg += np.bincount(bins[fov & ~gt], minlength=BINS)
    finally:
        for b in backends.values():
            b.deactivate()
    return evals


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def _biomarkers(e: ArtifactEval, threshold: float) -> list[dict[str, Any]]:
    return [vessel_biomarkers(m >= threshold, f).to_dict() for m, f in zip(e.maps, e.fovs, strict=True)]


def judge(evals: dict[str, ArtifactEval], reference: str, threshold: float | None,
          criteria: SegmentationCriteria, measured_only: tuple[str, ...] = ()) -> dict[str, Any]:
    """The gate's verdicts: the reference's metrics at the locked threshold (its max-F1 threshold when
    ``threshold`` is None) and each candidate's deltas against it. ``measured_only``: candidates that are
    reported but do not ship, so their verdict does not decide the gate."""
    ref = evals[reference]
    locked = threshold if threshold is not None else pixel_metrics(ref.pos, ref.neg)["threshold"]
    ref_m = pixel_metrics(ref.pos, ref.neg, locked)
    ref_bio = _biomarkers(ref, locked)
    out: dict[str, Any] = {"reference": reference, "threshold": locked, "criteria": criteria.to_dict(),
                           "n_images": len(ref.maps),
                           "artifacts": {reference: {**ref_m, "biomarkers": ref_bio, "seconds": ref.seconds}},
                           "gates": []}
    for k, e in evals.items():
        if k == reference:
            continue
        m = pixel_metrics(e.pos, e.neg, locked)
        bio = _biomarkers(e, locked)
        dices = [dice(a >= locked, b >= locked) for a, b in zip(ref.maps, e.maps, strict=True)]
        d_auc, d_f1 = m["auc"] - ref_m["auc"], m["f1"] - ref_m["f1"]
        failures = []
        if d_auc < criteria.min_delta_auc:
            failures.append(f"ΔAUC {d_auc:+.4f} < {criteria.min_delta_auc}")
        if d_f1 < criteria.min_delta_f1:
            failures.append(f"ΔF1 {d_f1:+.4f} < {criteria.min_delta_f1}")
        if min(dices) < criteria.min_mask_dice:
            failures.append(f"fp32-vs-{k} mask Dice {min(dices):.4f} < {criteria.min_mask_dice} on "
                            f"{sum(x < criteria.min_mask_dice for x in dices)} photo(s)")
        out["artifacts"][k] = {**m, "biomarkers": bio, "seconds": e.seconds}
        out["gates"].append({
            "artifact": k, "passed": not failures, "ships": k not in measured_only, "failures": failures,
            "auc": m["auc"], "f1": m["f1"],
            "sensitivity": m["sensitivity"], "specificity": m["specificity"], "delta_auc": d_auc, "delta_f1": d_f1,
            "delta_sensitivity": m["sensitivity"] - ref_m["sensitivity"], "mask_dice": dices,
            "min_mask_dice": min(dices),
            "delta_density": [b["density"] - a["density"] for a, b in zip(ref_bio, bio, strict=True)],
            "delta_fractal_dimension": [b["fractal_dimension"] - a["fractal_dimension"]
                                        for a, b in zip(ref_bio, bio, strict=True)]})
    out["passed"] = all(g["passed"] for g in out["gates"] if g["ships"])
    return out


def report_md(gate: dict[str, Any]) -> str:
    """The report.md section of a segmentation gate."""
    c = gate["criteria"]
    ref = gate["artifacts"][gate["reference"]]
    lines = ["## Segmentation gate", "",
             f"{gate['n_images']} validation photos; FOV pixels pooled at the photos' resolution; threshold "
             f"{gate['threshold']:.4f}. Criteria: ΔAUC >= {c['min_delta_auc']}, ΔF1 >= {c['min_delta_f1']}, "
             f"per-photo fp32-vs-candidate mask Dice >= {c['min_mask_dice']}.", "",
             "| artifact | pixel AUC | F1 (Dice) | sensitivity | specificity | ΔAUC | ΔF1 | min mask Dice | verdict |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| {gate['reference']} (reference) | {ref['auc']:.4f} | {ref['f1']:.4f} | {ref['sensitivity']:.4f} | "
             f"{ref['specificity']:.4f} | | | | |"]
    for g in gate["gates"]:
        lines.append(f"| {g['artifact']} | {g['auc']:.4f} | {g['f1']:.4f} | {g['sensitivity']:.4f} | "
                     f"{g['specificity']:.4f} | {g['delta_auc']:+.4f} | {g['delta_f1']:+.4f} | "
                     f"{g['min_mask_dice']:.4f} | {'PASS' if g['passed'] else 'FAIL: ' + '; '.join(g['failures'])}"
                     f"{'' if g['ships'] else ' (measured, not shipped)'} |")
    for g in gate["gates"]:
        dd, df = np.abs(g["delta_density"]), np.abs(g["delta_fractal_dimension"])
        lines.append(f"\n{g['artifact']}: biomarker change vs the reference, max over photos: vessel density "
                     f"{dd.max():.4f}, fractal dimension {df.max():.4f}.")
    lines.append(f"\nGate: {'PASSED' if gate['passed'] else 'FAILED'}.")
    return "\n".join(lines) + "\n"
