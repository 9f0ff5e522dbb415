"""``fundus-edge check``: re-run a bundle's clinical gate on any labelled set, through the runtime backends.

Torch-free: it needs only the runtime and numpy, so users can validate quantized accuracy on their own data
in their own CI with the device install.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..bundle.read import Artifact, Bundle, load_bundle
from ..datasets.labels import read_labels
from ..errors import MissingDependencyError
from ..gate.gate import GateCriteria, evaluate, gate
from ..gate.quality_gate import quality_summary
from ..quantization.calibration import prepare_inputs
from ..runtime.backends import BackendSettings, run_backend
from ..runtime.postprocess import referable_probability
from ..runtime.preprocess import relayout


def _scores(b: Bundle, art: Artifact, tensors: np.ndarray, settings: BackendSettings | None) -> np.ndarray:
    x = relayout(tensors, b.preprocessing.layout, art.layout)
    logits, _ = run_backend(art.format, b.path(art), x, settings)
    return referable_probability(logits, b.positive_classes)


def run_check(bundle_path: str | os.PathLike[str], val_csv: str | os.PathLike[str],
              val_images: str | os.PathLike[str] | None = None, settings: BackendSettings | None = None,
              referable_from: int = 2, artifacts: list[str] | None = None) -> dict[str, Any]:
    b = load_bundle(bundle_path)
    crit_d = b.manifest.get("gate", {}).get("criteria", {})
    criteria = GateCriteria(**{k: v for k, v in crit_d.items() if k in GateCriteria.__dataclass_fields__})
    val = read_labels(val_csv, val_images, referable_from)
    prepared = prepare_inputs(val.paths, b.preprocessing, quality=b.quality if b.quality.enabled else None)
    index = {str(p): i for i, p in enumerate(val.paths)}
    y = np.array([val.referable[index[s]] for s in prepared.sources], dtype=int)
    explicit = bool(artifacts)
    chosen = [b.artifact(a) for a in artifacts] if artifacts else list(b.artifacts)
    ref_id = b.manifest["operating_point"].get("locked_on", "onnx-fp32")
    ref_art = next((a for a in b.artifacts if a.id == ref_id), None)
    if ref_art is not None and ref_art not in chosen:
        chosen.insert(0, ref_art)
    threshold = b.operating_point.threshold
    scores: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    first_missing: MissingDependencyError | None = None
    for art in chosen:
        try:
            scores[art.id] = _scores(b, art, prepared.tensors, settings)
        except MissingDependencyError as exc:
            # This install cannot run that format: say so. Asked for by id, it is an error.
            if explicit and artifacts is not None and art.id in artifacts:
                raise
            skipped[art.id] = str(exc)
            first_missing = first_missing or exc
    if not scores and first_missing is not None:
        raise first_missing
    note = ""
    unrunnable_reference = False
    if ref_id not in scores and ref_art is not None:
        # The reference format's runtime is not installed here: gate against the fp32 file of a format that is.
        alt = next((a for a in b.artifacts if a.precision == "fp32" and a.id in scores), None)
        if alt is not None:
            note = f"{ref_id} cannot run in this install; gating against {alt.id} instead"
            ref_id, ref_art = alt.id, alt
        else:
            note = f"no fp32 reference can run in this install ({ref_id} needs a missing runtime): not gated"
            ref_art, unrunnable_reference = None, True
    evals = {k: evaluate(k, y, s, threshold, criteria) for k, s in scores.items()}
    quant = b.manifest.get("quantization") or {}
    gates = [gate(k, y, scores[ref_id], s, threshold, criteria, ref_id, evals[ref_id],
                  (quant.get(k) or {}).get("int8_mac_fraction"))
             for k, s in scores.items() if ref_art is not None and k != ref_id]
    passed = all(gates) and not unrunnable_reference
    quality = None
    if prepared.quality is not None and prepared.gradable is not None:
        quality = quality_summary(y, prepared.gradable, scores, threshold, criteria, prepared.quality,
                                  prepared.sources, b.quality.source, ref_id)
    lines = [f"bundle {b.bundle_id}: {len(y)} images ({int(y.sum())} referable) from {val_csv}; "
             f"threshold {threshold:.4f} locked at build ({b.operating_point.rule})"]
    lines += [f"  {k:<11} not checked: {msg}" for k, msg in skipped.items()]
    if note:
        lines.append(f"  note: {note}")
    for k, e in evals.items():
        lines.append(f"  {k:<11} AUC {e.auc:.4f} ({e.auc_ci[0]:.3f}-{e.auc_ci[1]:.3f})  sensitivity "
                     f"{e.sensitivity:.4f}  specificity {e.specificity:.4f}")
    for g in gates:
        lines.append(f"  gate {g.artifact} vs {g.reference}: ΔAUC {g.delta_auc:+.4f}, Δsens "
                     f"{g.delta_sensitivity:+.4f}, flips {g.flips} -> "
                     f"{'PASS' if g else 'FAIL: ' + '; '.join(g.failures)}")
    if ref_art is None:
        lines.append(f"  no {ref_id} artifact in this bundle: absolute metrics only, no relative gate")
    if quality is not None:
        lines.append(f"  image quality: {quality['n_ungradable']}/{len(y)} ungradable "
                     f"({quality['ungradable_rate']:.1%})" + (f" - failed: {quality['failed_measures']}"
                                                              if quality["failed_measures"] else ""))
        for k, e in quality["gradable"].items():
            pol = quality["ungradable_as_refer"][k]
            lines.append(f"  {k:<11} gradable only: n {e['n']}, sensitivity {_f(e.get('sensitivity'))}, specificity "
                         f"{_f(e.get('specificity'))}; ungradable = refer: sensitivity {_f(pol['sensitivity'])}, "
                         f"specificity {_f(pol['specificity'])}")
        if quality.get("note"):
            lines.append(f"  note: {quality['note']}")
    lines.append(f"check: {'PASSED' if passed else 'FAILED'}")
    return {"bundle_id": b.bundle_id, "n": len(y), "threshold": threshold, "passed": passed,
            "evaluations": {k: e.to_dict() for k, e in evals.items()}, "gates": [g.to_dict() for g in gates],
            "reference": ref_id, "skipped": skipped, "note": note,
            "problems": val.problems + [f"{s['source']}: {s['message']}" for s in prepared.skipped],
            "quality": quality, "text": "\n".join(lines)}


def _f(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"

