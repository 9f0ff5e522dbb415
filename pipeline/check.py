"""``fundus-edge check``: re-run a bundle's clinical gate on any labelled set, through the runtime backends.

Torch-free: it needs only the runtime and numpy, so users can validate quantized accuracy on their own data
in their own CI with the device install. The gate itself is :mod:`..gate.stage`, the one ``build`` runs;
the text for people is ``cli/check_format.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from ..bundle.read import Artifact, Bundle, load_bundle
from ..datasets.labels import read_labels
from ..gate.drift import DriftFinding, operating_point_drift, targets
from ..gate.gate import FAIL, INSUFFICIENT, PASS, Evaluation, GateCriteria, GateResult
from ..gate.stage import GateArtifact, GateData, QualityInputs, Scored, gate_scores, score_artifacts
from ..quantization.calibration import prepare_inputs
from ..runtime.backends import BackendSettings

if TYPE_CHECKING:
    from ..quantization.stability import Stability, StabilityConfig
    from .device_gate import DeviceGate, DeviceGateConfig


@dataclass
class CheckResult:
    """A bundle's gate re-run on a labelled set."""

    bundle_id: str
    source: str  # the labels CSV
    n: int
    n_referable: int
    threshold: float
    rule: str  # how the build locked the threshold
    passed: bool
    reference: str
    gated: bool  # False: no reference artifact could be gated against (absolute metrics only)
    evaluations: dict[str, Evaluation]
    gates: list[GateResult]
    skipped: dict[str, str] = field(default_factory=dict)  # artifact id -> why this install cannot run it
    note: str = ""
    problems: list[str] = field(default_factory=list)
    quality: dict[str, Any] | None = None
    drift: list[DriftFinding] = field(default_factory=list)  # operating point at the locked threshold vs targets
    device: DeviceGate | None = None  # the gate on the device's own kernels (``check --device``)
    stability: Stability | None = None  # the int8 file re-quantized on K calibration subsets (``--stability``)

    @property
    def verdict(self) -> str:
        """PASS | FAIL | INSUFFICIENT EVIDENCE over the int8-vs-fp32 gates, on this machine and (``--device``) on
        the device's outputs (FAIL too when nothing could be gated)."""
        verdicts = {g.verdict for g in self.gates} | ({self.device.verdict} if self.device else set())
        if not self.passed and verdicts <= {PASS}:
            return FAIL
        return FAIL if FAIL in verdicts else (INSUFFICIENT if INSUFFICIENT in verdicts else PASS)

    @property
    def drifted(self) -> bool:
        return any(d.status == "DRIFT" for d in self.drift)

    def to_dict(self) -> dict[str, Any]:
        return {"bundle_id": self.bundle_id, "n": self.n, "threshold": self.threshold, "passed": self.passed,
                "verdict": self.verdict, "drift": [d.to_dict() for d in self.drift], "drifted": self.drifted,
                "evaluations": {k: e.to_dict() for k, e in self.evaluations.items()},
                "gates": [g.to_dict() for g in self.gates], "reference": self.reference, "skipped": self.skipped,
                "note": self.note, "problems": self.problems, "quality": self.quality,
                "device": self.device.to_dict() if self.device else None,
                "stability": self.stability.to_dict() if self.stability else None}


def _gate_artifact(b: Bundle, art: Artifact) -> GateArtifact:
    fraction = ((b.manifest.get("quantization") or {}).get(art.id) or {}).get("int8_mac_fraction")
    return GateArtifact(art.id, art.format, art.layout, b.path(art), fraction)


def _choose_reference(b: Bundle, scored: Scored, ref_id: str) -> tuple[str, bool, str, bool]:
    """(reference id, whether to gate against it, note, whether the reference could not run at all).

    When the reference format's runtime is not installed here, gate against the fp32 file of a format that is."""
    ref_art = next((a for a in b.artifacts if a.id == ref_id), None)
    if ref_art is None:
        return ref_id, False, "", False
    if ref_id in scored.scores:
        return ref_id, True, "", False
    alt = next((a for a in b.artifacts if a.precision == "fp32" and a.id in scored.scores), None)
    if alt is not None:
        return alt.id, True, f"{ref_id} cannot run in this install; gating against {alt.id} instead", False
    return ref_id, False, f"no fp32 reference can run in this install ({ref_id} needs a missing runtime): not gated", \
        True


def run_check(bundle_path: str | os.PathLike[str], val_csv: str | os.PathLike[str],
              val_images: str | os.PathLike[str] | None = None, settings: BackendSettings | None = None,
              referable_from: int = 2, artifacts: list[str] | None = None,
              device: DeviceGateConfig | None = None, log: Callable[[str], None] | None = None,
              stability: StabilityConfig | None = None) -> CheckResult:
    """``device``: also gate the int8 files on the outputs of that device's kernels (emulated; slow).
    ``stability``: also re-quantize the ONNX int8 file on K calibration subsets and report the spread."""
    b = load_bundle(bundle_path)
    crit_d = b.manifest.get("gate", {}).get("criteria", {})
    criteria = GateCriteria(**{k: v for k, v in crit_d.items() if k in GateCriteria.__dataclass_fields__})
    val = read_labels(val_csv, val_images, referable_from)
    prepared = prepare_inputs(val.paths, b.preprocessing, quality=b.quality if b.quality.enabled else None)
    index = {str(p): i for i, p in enumerate(val.paths)}
    y = np.array([val.referable[index[s]] for s in prepared.sources], dtype=int)
    chosen = [b.artifact(a) for a in artifacts] if artifacts else list(b.artifacts)
    ref_id = b.manifest["operating_point"].get("locked_on", "onnx-fp32")
    ref_art = next((a for a in b.artifacts if a.id == ref_id), None)
    if ref_art is not None and ref_art not in chosen:
        chosen.insert(0, ref_art)
    quality = None
    if prepared.quality is not None and prepared.gradable is not None:
        quality = QualityInputs(prepared.gradable, prepared.quality, prepared.sources, b.quality.source)
    data = GateData(prepared.tensors, b.preprocessing.layout, y, b.positive_classes, quality)
    # an artifact asked for by id must run; otherwise, one this install cannot run is skipped and said so
    scored = score_artifacts([_gate_artifact(b, a) for a in chosen], data, settings, required=artifacts or ())
    if not scored.scores and scored.first_missing is not None:
        raise scored.first_missing
    reference, relative, note, unrunnable = _choose_reference(b, scored, ref_id)
    outcome = gate_scores(scored.scores, data, reference, b.operating_point.threshold, criteria,
                          {a.id: _gate_artifact(b, a).int8_mac_fraction for a in chosen}, relative=relative)
    op = b.operating_point
    goal = targets(op.rule, op.sensitivity, op.specificity)
    drift = [d for k, s in scored.scores.items() for d in operating_point_drift(k, y, s, op.threshold, goal)]
    on_device = stable = None
    if (device or stability) and not relative:
        from ..errors import UsageError

        raise UsageError(f"--device and --stability need the fp32 reference ({note or 'none in the bundle'})")
    if stability is not None:
        from ..quantization.stability import calibration_stability

        stable = calibration_stability(b, data, scored.scores[reference], outcome.threshold, criteria, stability,
                                       reference, settings, log)
        stable.shipped = next((g.to_dict() for g in outcome.gates if g.artifact == stable.artifact), {})
    if device is not None:
        from .device_gate import device_gate

        fractions = {a.id: _gate_artifact(b, a).int8_mac_fraction for a in chosen}
        on_device = device_gate(b, prepared.sources, data, scored.scores, reference, outcome.threshold, criteria,
                                list(scored.scores), device, settings, fractions, log)
    return CheckResult(b.bundle_id, str(val_csv), len(y), int(y.sum()), outcome.threshold, b.operating_point.rule,
                       outcome.passed and not unrunnable and (on_device is None or on_device.passed),
                       reference, relative, outcome.evaluations, outcome.gates,
                       scored.skipped, note,
                       val.problems + [f"{s['source']}: {s['message']}" for s in prepared.skipped], outcome.quality,
                       drift, on_device, stable)
