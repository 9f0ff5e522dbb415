"""The segmentation build's last stage: report.json + report.md, the typed manifest (task "segmentation"), and
the bundle moved into place; or, when the gate fails and that is not allowed, the report only and a
:class:`GateFailedError`."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..bundle.manifest import (
    Artifact,
    GateEntry,
    GateSummary,
    Manifest,
    OperatingPoint,
    OutputSpec,
    Producer,
    SegmentationMeaning,
    TensorSpec,
)
from ..bundle.manifest import ModelInfo as ManifestModel
from ..bundle.read import sha256_file
from ..errors import GateFailedError
from ..gate.segmentation import report_md
from ..runtime.preprocess import PreprocessSpec
from ..runtime.quality import QualitySpec
from .bundle_stage import publish
from .config import BuildResult
from .progress import Progress

if TYPE_CHECKING:
    from .build_seg import SegBuild

SHIPPED = {"onnx-fp32": "model.fp32.onnx", "onnx-int8": "model.int8.onnx", "tflite-fp32": "model.fp32.tflite",
           "tflite-int8": "model.int8.tflite"}


def make_seg_report(b: SegBuild) -> dict[str, Any]:
    from .bundle_stage import producer_versions

    gate = b.gate
    ref = gate["artifacts"][gate["reference"]]
    return {"task": "segmentation", "model": {"source": b.model.source, "arch": b.model.arch,
                                               "contract": b.model.contract.to_dict()},
            "dense_preprocessing": b.model.dense.to_dict(),
            "validation": [{"image": str(v.image), "mask": str(v.mask), "fov": str(v.fov) if v.fov else None}
                           for v in b.val],
            "calibration_selection": b.calibration, "export": b.export, "quantization": b.quantization,
            "operating_point": {"threshold": gate["threshold"], "rule": b.threshold_rule,
                                "locked_on": gate["reference"]},
            "reference": {k: ref[k] for k in ("auc", "f1", "sensitivity", "specificity", "pixels")},
            "segmentation_gate": gate, "gates": gate["gates"], "gate_passed": gate["passed"],
            "formats_not_built": {"tflite": b.no_tflite} if b.no_tflite else {}, "producer": producer_versions()}


def _figures(folder: Path, report: dict[str, Any]) -> tuple[list[Path], str]:
    """figures/seg-*.png (pixel ROC, per-photo mask Dice and biomarker change; their numbers go to
    ``report["figures"]``) and the markdown that shows them; none when matplotlib is not installed."""
    import importlib.util

    from ..gate.plots_seg import render_seg_pngs, seg_figure_data

    gate = report["segmentation_gate"]
    if importlib.util.find_spec("matplotlib") is None or "roc" not in gate:
        return [], ""
    report["figures"] = seg_figure_data(gate, gate["roc"])
    (folder / "figures").mkdir(exist_ok=True)
    paths = []
    for name, data in render_seg_pngs(report["figures"]).items():
        paths.append(folder / "figures" / f"{name}.png")
        paths[-1].write_bytes(data)
    report["figure_files"] = [str(p.relative_to(folder)) for p in paths]
    return paths, "\n## Figures\n\n" + "\n".join(f"![{p.stem}](figures/{p.name})" for p in paths) + "\n"


def write_seg_reports(folder: Path, report: dict[str, Any]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    figures, figures_md = _figures(folder, report)
    rj, rm = folder / "report.json", folder / "report.md"
    rj.write_text(json.dumps(report, indent=2, default=float) + "\n")
    op = report["operating_point"]
    why = report.get("formats_not_built", {}).get("tflite")
    head = (f"# Segmentation build report\n\nModel {report['model']['source']} ({report['model']['arch']}); "
            f"threshold {op['threshold']:.4f} ({op['rule']})." + (f" TFLite: not built ({why})." if why else "")
            + "\n\n")
    rm.write_text(head + report_md(report["segmentation_gate"]) + figures_md)
    return [rj, rm, *figures]


def _gate_entry(g: dict[str, Any], min_dice: float) -> GateEntry:
    # flips: photos whose fp32-vs-candidate mask Dice is under the criterion (the dense analogue of a flip)
    below = sum(d < min_dice for d in g["mask_dice"])
    return GateEntry(passed=bool(g["passed"]), delta_auc=float(g["delta_auc"]),
                     delta_sensitivity=float(g["delta_sensitivity"]), flips=int(below))


def seg_manifest(b: SegBuild, staging: Path, report_files: list[Path]) -> tuple[Manifest, list[str]]:
    from ..export.onnx import INPUT_NAME, OUTPUT_NAME
    from .bundle_stage import producer_versions

    gate, m, cfg = b.gate, b.model, b.cfg
    shipped = {k: v for k, v in SHIPPED.items() if (staging / v).is_file()}
    by_id = {g["artifact"]: g for g in gate["gates"]}
    artifacts = [Artifact(id=k, path=p, format="tflite" if k.startswith("tflite") else "onnx",
                          precision="int8" if "int8" in k else "fp32", layout="NCHW", io_dtype="float32",
                          sha256=sha256_file(staging / p),
                          gate={k2: v for k2, v in by_id[k].items() if k2 != "failures"} if k in by_id else None)
                 for k, p in shipped.items()]
    digest = hashlib.sha256(b"".join(bytes.fromhex(a.sha256 or "") for a in artifacts)).hexdigest()[:12]
    name = cfg.name or (m.source.split(":", 1)[1] if m.source.startswith("reference:") else Path(m.source).stem)
    channels = m.contract.num_outputs
    ref = gate["artifacts"][gate["reference"]]
    default = "onnx-int8" if gate["passed"] and "onnx-int8" in shipped else "onnx-fp32"
    manifest = Manifest(
        schema="fundus-edge/bundle", schema_version=2, task="segmentation", bundle_id=f"{name}-{digest}", name=name,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        model=ManifestModel(source=m.source, arch=m.arch, num_outputs=channels, referable_rule=None,
                            training=m.meta.get("training")),
        input=TensorSpec(name=INPUT_NAME, shape=("batch", m.dense.channels, "height", "width"), dtype="float32",
                         layout="NCHW"),
        output=OutputSpec(name=OUTPUT_NAME, shape=("batch", channels, "height", "width"), dtype="float32",
                          meaning=SegmentationMeaning(kind="pixel-logits", activation="sigmoid", channels=channels,
                                                      vessel_channel=0, threshold=round(gate["threshold"], 6),
                                                      class_names=tuple(m.meta.get("class_names") or
                                                                        [f"channel-{i}" for i in range(channels)]))),
        preprocessing=PreprocessSpec(), dense=m.dense,
        operating_point=OperatingPoint(threshold=round(gate["threshold"], 6), rule=b.threshold_rule,
                                       locked_on=gate["reference"], sensitivity=ref["sensitivity"],
                                       specificity=ref["specificity"]),
        artifacts=tuple(artifacts), default_artifact=default,
        gate=GateSummary(passed=bool(gate["passed"]), allow_failed_gate=cfg.allow_failed_gate,
                         criteria={**gate["criteria"], "kind": "segmentation"}, n_validation=gate["n_images"],
                         summary={k: _gate_entry(g, gate["criteria"]["min_mask_dice"])
                                  for k, g in by_id.items() if k in shipped}),
        quality=cfg.quality or QualitySpec(),
        quantization={k: v for k, v in b.quantization.items() if k in shipped} or None,
        export={k: v for k, v in b.export.items() if k in shipped} or None,
        producer=Producer.from_dict(producer_versions()), files={})
    return manifest, [a.path for a in artifacts] + [str(p.relative_to(staging)) for p in report_files]


def write_seg_bundle(b: SegBuild, staging: Path, progress: Progress, signer: Any = None) -> BuildResult:
    out, passed = b.cfg.out, bool(b.gate["passed"])
    report = make_seg_report(b)
    progress.stage("writing bundle" if passed or b.cfg.allow_failed_gate else "gate failed: writing the report only")
    if not passed and not b.cfg.allow_failed_gate:
        report_dir = out.parent / f"{out.name}.gate-failed"
        shutil.rmtree(report_dir, ignore_errors=True)
        write_seg_reports(report_dir, report)
        failures = "; ".join(f"{g['artifact']}: {', '.join(g['failures'])}" for g in b.gate["gates"]
                             if g["ships"] and not g["passed"])
        raise GateFailedError(f"segmentation gate failed ({failures}); no bundle written. Report: "
                              f"{report_dir}/report.md. Relax the gate deliberately, pass --allow-failed-gate, or "
                              "ship fp32 only with --precisions fp32")
    for g in b.gate["gates"]:
        if not g["ships"]:
            (staging / f"{g['artifact']}.onnx").unlink(missing_ok=True)  # measured, not shipped
    report_files = write_seg_reports(staging, report)
    manifest, files = seg_manifest(b, staging, report_files)
    written = publish(staging, out, manifest, files, signer, progress)
    return BuildResult(out, written.manifest, report, passed, out, signed_by=written.signed_by)
