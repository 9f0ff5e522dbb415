"""The build's last stage: the report, and the bundle (manifest built in ONE function, :func:`build_manifest`)
written to the staging directory, signed if asked, and moved into place; or, when the gate fails, the report
only and a :class:`GateFailedError` that says what failed."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from .. import __version__
from ..bundle.manifest import (
    Artifact,
    ClassificationMeaning,
    Compute,
    Device,
    GateEntry,
    GateSummary,
    Manifest,
    OperatingPoint,
    OutputSpec,
    Producer,
    TensorSpec,
)
from ..bundle.manifest import (
    ModelInfo as ManifestModel,
)
from ..bundle.read import sha256_file
from ..bundle.write import write_manifest
from ..errors import GateFailedError, GateInsufficientEvidenceError
from ..gate.gate import FAIL, INSUFFICIENT
from ..gate.quality_gate import manifest_summary
from ..gate.report import write_reports
from .artifacts import BuiltArtifact
from .build_gate import BuildGate
from .config import BuildConfig
from .formats import REGISTRY
from .progress import Progress
from .stages import BuildData, Exported, ModelInfo, Quantized, Reference, built_artifacts


def producer_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"fundus_edge": __version__, "python": platform.python_version(), "platform": platform.platform()}
    for dist in ("torch", "torchvision", "onnx", "onnxscript", "onnxruntime", "litert-torch", "ai-edge-quantizer",
                 "ai-edge-litert", "numpy", "pillow"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return versions


@dataclass
class Built:
    """Everything the stages before this one produced: what the report and the manifest are made of."""

    cfg: BuildConfig
    model: ModelInfo
    data: BuildData
    exported: list[Exported]
    quantized: list[Quantized]
    reference: Reference
    gate: BuildGate

    @property
    def artifacts(self) -> list[BuiltArtifact]:
        return built_artifacts(self.exported, self.quantized)

    @property
    def export_info(self) -> dict[str, Any]:
        return {e.artifact.id: e.info for e in self.exported}

    @property
    def quantization(self) -> dict[str, Any]:
        return {q.artifact.id: q.summary for q in self.quantized}

    @property
    def usable(self) -> bool:
        """The int8 files may ship: the gate passed, or saw no harm and INSUFFICIENT EVIDENCE was allowed."""
        return self.gate.passed or (self.gate.outcome.verdict == INSUFFICIENT and self.cfg.allow_insufficient_evidence)

    def images(self) -> dict[str, Any]:
        """Which validation images searched (a fallback selected on them) and which certified each gate."""
        src = self.data.val_in.sources
        searched = any(q.fallback is not None and q.fallback.excluded for q in self.quantized)
        cert = {g.artifact: (g.certification or {}).get("images", "all") for g in self.gate.outcome.gates}
        return {"split": {"method": "stratified by label, seeded", "seed": self.cfg.criteria.seed, "fraction": 0.5},
                "search": [src[i] for i in self.reference.search] if searched else [],
                "certification": [src[i] for i in self.reference.certify] if searched else list(src),
                "certified_on": cert}

    @property
    def name(self) -> str:
        return self.cfg.name or Path(self.model.source).stem

    def artifact_gate(self, artifact_id: str) -> dict[str, Any]:
        """The manifest's per-artifact gate entry (the reference's own: its parity check and metrics)."""
        o = self.gate.outcome
        g = next((g for g in o.gates if g.artifact == artifact_id), None)
        if g is not None:
            return g.to_dict()
        r = o.reference_eval
        return {"passed": self.export_info[o.reference]["passed"], "role": "reference", "auc": r.auc,
                "sensitivity": r.sensitivity, "specificity": r.specificity}


def make_report(b: Built) -> dict[str, Any]:
    """report.json (and report.md, figures): the gate's evidence, written whether or not the gate passed."""
    o, cfg = b.gate.outcome, b.cfg
    ref_id = o.reference
    val, val_in = b.data.val, b.data.val_in
    report: dict[str, Any] = {
        "name": b.name,
        "model": {"source": b.model.source, "source_format": b.model.kind,
                  "source_sha256": (b.model.source_file or {}).get("sha256")},
        "gate_passed": o.passed,
        "verdict": o.verdict,
        "allow_failed_gate": cfg.allow_failed_gate,
        "allow_insufficient_evidence": cfg.allow_insufficient_evidence,
        "images": b.images(),
        "criteria": cfg.criteria.to_dict(),
        "operating_point": {"threshold": o.threshold, "rule": cfg.criteria.operating_point, "locked_on": ref_id},
        "reference": o.reference_eval.to_dict(),
        "gates": [g.to_dict() for g in o.gates],
        "confusion": {ref_id: o.reference_eval.confusion, **{g.artifact: g.candidate_eval.confusion for g in o.gates}},
        "export": b.export_info,
        "quantization": b.quantization,
        "layer_errors": [e for q in b.quantized for e in q.layer_errors],
        "artifacts": [{"id": a.id, "path": a.path, "bytes": b.gate.sizes[a.id], "mean_infer_ms": b.gate.infer_ms[a.id]}
                      for a in b.artifacts],
        "validation": {"csv": str(cfg.val), "layout": val.layout, "n": len(val_in.sources),
                       "description": cfg.val_description, "synthetic": cfg.val_synthetic,
                       "referable_from": cfg.referable_from,
                       "problems": val.problems + [f"{s['source']}: {s['message']}" for s in val_in.skipped]},
        "scores": b.gate.scores,
        "labels": b.data.labels.tolist(),
    }
    if o.quality is not None:
        gradable = val_in.gradable
        report["quality"] = o.quality
        report["gradable"] = gradable.tolist() if gradable is not None else None
    return report


def gate_failure(b: Built, report_dir: Path) -> GateFailedError:
    """The error a failed gate raises: each failing artifact, what its fallback tried, and what to do."""
    gates = b.gate.outcome.gates
    failures = "; ".join(f"{g.artifact}: {', '.join(g.failures)}" for g in gates if g.verdict == FAIL)
    for q in b.quantized:
        fb = q.fallback
        g_fb = next((g for g in gates if g.artifact == q.artifact.id), None)
        if fb is None or g_fb is None or g_fb.passed or len(fb.steps) < 2:
            continue
        failures += (f". {q.artifact.id}: the fallback tried {len(fb.steps) - 1} candidate(s); the best kept "
                     f"{len(fb.excluded)} node(s) in float ({fb.quant.int8_mac_fraction:.1%} of MACs int8): "
                     f"ΔAUC {g_fb.delta_auc:+.4f}, Δsensitivity {g_fb.delta_sensitivity:+.4f}, flips {g_fb.flips}")
    return GateFailedError(
        f"clinical gate failed ({failures}); no bundle written. Report: {report_dir}/report.md. "
        "Fix the model or calibration, relax the gate deliberately, or pass --allow-failed-gate"
        + ("; if int8 cannot hold the gate on this model, ship fp32 only with --precisions fp32"
           if any(q.fallback is not None and not q.fallback.passed for q in b.quantized) else ""))


def gate_insufficient(b: Built, report_dir: Path) -> GateInsufficientEvidenceError:
    """The error an INSUFFICIENT EVIDENCE verdict raises: what could not be shown, and how many images would."""
    what = "; ".join(f"{g.artifact}: {', '.join(g.insufficient)}" for g in b.gate.outcome.gates if g.insufficient)
    return GateInsufficientEvidenceError(
        f"clinical gate: INSUFFICIENT EVIDENCE ({what}); no harm was observed, but the confidence bounds are not "
        f"inside the margins on these images; no bundle written. Report: {report_dir}/report.md. Validate on more "
        "labelled images, widen the margins deliberately, or pass --allow-insufficient-evidence (recorded in the "
        "manifest)")


def default_artifact(b: Built, progress: Progress) -> tuple[str, dict[str, Any] | None]:
    """(the bundle's default artifact id, the manifest's ``device`` entry): the reference format's int8 file when
    the gate passed, else its fp32 file; a device profile (``--device``) may prefer another."""
    ref = b.reference.artifact
    int8 = REGISTRY[ref.format].artifact_id("int8")
    ids = [a.id for a in b.artifacts]
    default = int8 if b.usable and int8 in ids else ref.id
    if not b.cfg.device:
        return default, None
    from ..devices.build_target import device_default

    entries = [a.entry() for a in b.artifacts]
    return device_default(b.cfg.device, entries, b.gate.outcome.gates, default, progress.log,
                          b.cfg.allow_insufficient_evidence)


def build_manifest(b: Built, staging: Path, report_files: list[Path], default: str,
                   device_entry: dict[str, Any] | None) -> tuple[Manifest, list[str]]:
    """The typed manifest and the files it covers (``write_manifest`` fills in each file's checksum)."""
    o, cfg, m, spec = b.gate.outcome, b.cfg, b.model, b.model.spec
    artifacts = [Artifact.from_dict({**a.entry(), "gate": b.artifact_gate(a.id),
                                     "sha256": sha256_file(staging / a.path)}) for a in b.artifacts]
    digest = hashlib.sha256()
    for a in artifacts:
        digest.update(bytes.fromhex(a.sha256 or ""))
    chw = (3, spec.size, spec.size) if spec.layout == "NCHW" else (spec.size, spec.size, 3)
    ref = o.reference_eval
    compute = next((e.compute for e in b.exported if e.compute is not None), None)
    manifest = Manifest(
        schema="fundus-edge/bundle", schema_version=2, task="classification",
        bundle_id=f"{b.name}-{digest.hexdigest()[:12]}", name=b.name,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        model=ManifestModel(source=m.source, arch=m.arch, num_outputs=m.n_out,
                            referable_rule=f"grade >= {cfg.referable_from}", training=m.meta.get("training"),
                            source_format=cast(Any, m.kind), source_sha256=(m.source_file or {}).get("sha256")),
        input=TensorSpec(name=m.input_name, shape=("batch", *chw), dtype="float32", layout=cast(Any, spec.layout)),
        output=OutputSpec(name=m.output_name, shape=("batch", m.n_out), dtype="float32", meaning=ClassificationMeaning(
            kind="logits", activation="sigmoid" if m.n_out == 1 else "softmax",
            class_names=tuple(m.class_names), positive_classes=tuple(m.positive))),
        preprocessing=spec,
        operating_point=OperatingPoint(threshold=o.threshold, rule=cfg.criteria.operating_point,
                                       locked_on=o.reference, sensitivity=ref.sensitivity,
                                       specificity=ref.specificity),
        artifacts=tuple(artifacts), default_artifact=default,
        gate=GateSummary(passed=o.passed, verdict=o.verdict, allow_failed_gate=cfg.allow_failed_gate,
                         allow_insufficient_evidence=cfg.allow_insufficient_evidence, criteria=cfg.criteria.to_dict(),
                         n_validation=len(b.data.labels),
                         summary={g.artifact: GateEntry(passed=bool(g.passed), verdict=g.verdict, delta_auc=g.delta_auc,
                                                        delta_sensitivity=g.delta_sensitivity, flips=g.flips)
                                  for g in o.gates},
                         quality=manifest_summary(o.quality) if o.quality else None),
        quality=b.data.quality, quantization=b.quantization, export=b.export_info,
        compute=Compute.from_dict(compute) if compute else None, producer=Producer.from_dict(producer_versions()),
        device=Device.from_dict(device_entry) if device_entry else None, files={})
    return manifest, [a.path for a in b.artifacts] + [str(p.relative_to(staging)) for p in report_files]


@dataclass(frozen=True)
class Written:
    """Where the bundle went, its manifest as read back (checksums verified), and who signed it."""

    out: Path
    manifest: dict[str, Any]
    signed_by: str | None


def write_bundle_stage(b: Built, report: dict[str, Any], staging: Path, signer: Any,
                       progress: Progress) -> Written:
    """Write the bundle (or, when the gate fails and that is not allowed, the report only and raise
    :class:`GateFailedError`). The bundle appears at ``cfg.out`` by an atomic rename of ``staging``."""
    out = b.cfg.out
    write = b.usable or b.cfg.allow_failed_gate
    progress.stage("writing bundle" if write else f"gate {b.gate.outcome.verdict}: writing the report only")
    if not write:
        report_dir = out.parent / f"{out.name}.gate-failed"
        shutil.rmtree(report_dir, ignore_errors=True)
        write_reports(report_dir, report)
        raise (gate_failure if b.gate.outcome.verdict == FAIL else gate_insufficient)(b, report_dir)
    report_files = write_reports(staging, report)
    default, device_entry = default_artifact(b, progress)
    manifest, files = build_manifest(b, staging, report_files, default, device_entry)
    return publish(staging, out, manifest, files, signer, progress)


def publish(staging: Path, out: Path, manifest: Manifest, files: list[str], signer: Any,
            progress: Progress) -> Written:
    """Write the manifest (checksums of ``files``), sign it, move ``staging`` to ``out`` atomically, and read the
    bundle back as the device would (checksums and signature verified). Shared by every task's build."""
    write_manifest(staging, manifest, files=files)
    if signer is not None:
        from ..bundle.signing import sign_bundle

        sign_bundle(staging, signer)
        progress.say(f"signed manifest.json with key {signer.key_id} -> manifest.sig")
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)
    progress.say(f"bundle {manifest.bundle_id} -> {out} ({progress.seconds()})")
    from ..bundle.read import load_bundle

    written = load_bundle(out).manifest
    signed_by = None
    if signer is not None:
        from ..bundle.signing import check_signature

        signed_by = check_signature(out, {signer.key_id: signer.public_key()}, require=True).key_id
    return Written(out, written, signed_by)
