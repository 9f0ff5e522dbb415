"""The build's stages before the gate: load the model, prepare the images, export each format (with its
parity check), lock the operating point on the reference, quantize each format. Each stage takes and
returns typed values; :func:`..build.run_build` runs them in order."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..datasets.labels import LabelledSet, list_images, read_labels
from ..errors import UsageError
from ..export.contract import INPUT_NAME, OUTPUT_NAME
from ..gate.evidence import stratified_split
from ..gate.metrics import lock_threshold
from ..gate.stage import GateArtifact, GateData, QualityInputs, score_artifact
from ..quantization.calibration import PreparedInputs, prepare_inputs, select_calibration
from ..quantization.fallback import MOSTLY_FLOAT, FallbackResult, GateSpec
from ..runtime.backends import BackendSettings
from ..runtime.preprocess import PreprocessSpec, relayout
from ..runtime.quality import QualitySpec
from .artifacts import BuiltArtifact, QuantRequest
from .config import BuildConfig
from .formats import FormatSpec
from .progress import Progress

PARITY_VAL_IMAGES = 24  # the export parity check runs on this many validation images
PARITY_CALIB_IMAGES = 8  # ... and this many calibration images (plus --parity-images)


@dataclass(frozen=True)
class ModelInfo:
    """The loaded model and what the build needs to know about its inputs and outputs."""

    module: Any  # torch.nn.Module, eval mode
    source: str
    arch: str | None
    meta: dict[str, Any]
    spec: PreprocessSpec
    n_out: int
    class_names: list[str]
    positive: list[int]
    kind: str = "pytorch"  # what the model came as: "pytorch", or a brought "onnx" / "tflite" file
    input_name: str = INPUT_NAME  # the fp32 file's input and output (a brought ONNX file keeps its own)
    output_name: str = OUTPUT_NAME
    source_file: dict[str, Any] | None = None  # a brought file's facts: format, sha256, input, layout ...


def _default_class_names(n_out: int) -> list[str]:
    if n_out == 1:
        return ["referable"]
    return ["no-referable", "referable"] if n_out == 2 else [f"grade-{i}" for i in range(n_out)]


def _default_positive(n_out: int, referable_from: int) -> list[int]:
    return [0] if n_out == 1 else ([1] if n_out == 2 else list(range(referable_from, n_out)))


def preprocessing_for(cfg: BuildConfig, meta: dict[str, Any]) -> PreprocessSpec:
    """The build's preprocessing: ``cfg.preprocessing``, else the checkpoint's recorded one, else the defaults;
    then the command line's preprocessing flags (``cfg.preprocess_overrides``) on top."""
    spec = cfg.preprocessing or (PreprocessSpec.from_dict(meta["preprocessing"]) if "preprocessing" in meta
                                 else PreprocessSpec())
    return replace(spec, **cfg.preprocess_overrides) if cfg.preprocess_overrides else spec


def classes_for(cfg: BuildConfig, meta: dict[str, Any], n_out: int, num_classes: int | None
                ) -> tuple[list[str], list[int]]:
    """Class names and referable classes: the flags, else the checkpoint's, else defaults for ``n_out``."""
    if num_classes and num_classes != n_out:
        raise UsageError(f"--num-classes {num_classes} but the model outputs {n_out} values")
    class_names = cfg.class_names or meta.get("class_names") or _default_class_names(n_out)
    positive = cfg.positive_classes or meta.get("positive_classes") or _default_positive(n_out, cfg.referable_from)
    if len(class_names) != n_out:
        raise UsageError(f"{len(class_names)} class names for a model with {n_out} outputs")
    return list(class_names), list(positive)


def load_model_stage(cfg: BuildConfig, progress: Progress) -> ModelInfo:
    """The PyTorch model stage: load the module, probe its output, check the classification contract."""
    from ..export.contract import check_output
    from ..export.load import load_model
    from ..export.validate import torch_outputs

    progress.stage(f"loading model {cfg.model}")
    loaded = load_model(cfg.model, cfg.arch, cfg.num_classes)
    meta = loaded.meta
    spec = preprocessing_for(cfg, meta)
    num_classes = loaded.num_classes or int(meta.get("num_classes", 0)) or None
    probe_shape = (1, 3, spec.size, spec.size) if spec.layout == "NCHW" else (1, spec.size, spec.size, 3)
    probed = torch_outputs(loaded.module, np.zeros(probe_shape, np.float32))
    n_out = check_output(probed.shape, "classification", probe_shape, spec.layout).num_outputs
    class_names, positive = classes_for(cfg, meta, n_out, num_classes)
    progress.say(f"{loaded.source}: {n_out} outputs, referable classes {positive} ({progress.seconds()})")
    return ModelInfo(loaded.module, loaded.source, loaded.arch or meta.get("arch"), meta, spec, n_out, class_names,
                     positive)


@dataclass(frozen=True)
class BuildData:
    """The validation and calibration images, preprocessed once by the runtime's preprocessing."""

    val: LabelledSet
    val_in: PreparedInputs
    labels: np.ndarray  # referable (1) or not, per kept validation image
    calib_in: PreparedInputs
    calibration_selection: dict[str, Any]
    parity_x: np.ndarray  # the images of the export parity checks (model layout)
    quality: QualitySpec

    def gate_data(self, layout: str, positive: list[int]) -> GateData:
        gradable = self.val_in.gradable
        q = None
        if gradable is not None and self.val_in.quality is not None:
            q = QualityInputs(gradable, self.val_in.quality, self.val_in.sources, self.quality.source)
        return GateData(self.val_in.tensors, layout, self.labels, positive, q)


def prepare_data_stage(cfg: BuildConfig, spec: PreprocessSpec, progress: Progress) -> BuildData:
    if cfg.calib is None or cfg.val is None:
        raise UsageError("build needs --calib (a folder of fundus images) and --val (a labels CSV)")
    progress.stage("preprocessing calibration and validation images (runtime preprocessing)")
    val = read_labels(cfg.val, cfg.val_images, cfg.referable_from)
    for p in val.problems[:5]:
        progress.say(f"skipped: {p}")
    if len(val.problems) > 5:
        progress.say(f"... {len(val.problems) - 5} more skipped rows (all listed in report.json)")
    qspec = cfg.quality or QualitySpec()
    val_in = prepare_inputs(val.paths, spec, progress.counter("validation"), quality=qspec if qspec.enabled else None)
    kept = {s: i for i, s in enumerate(map(str, val.paths))}
    y = np.array([val.referable[kept[s]] for s in val_in.sources], dtype=int)
    calib_files = list_images(cfg.calib)
    pick = select_calibration(len(calib_files), cfg.calib_size, cfg.calib_seed)
    calib_in = prepare_inputs([calib_files[i] for i in pick], spec, progress.counter("calibration"))
    parity_parts = [val_in.tensors[:PARITY_VAL_IMAGES], calib_in.tensors[:PARITY_CALIB_IMAGES]]
    if cfg.parity_images:
        parity_parts.append(prepare_inputs(cfg.parity_images, spec).tensors)
    selection = {"from": str(cfg.calib), "available": len(calib_files), "requested": cfg.calib_size,
                 "used": len(calib_in.sources), "seed": cfg.calib_seed, "method": "seeded random subset"}
    progress.say(f"{len(val_in.sources)} validation ({int(y.sum())} referable), {len(calib_in.sources)} calibration "
                 f"images ({progress.seconds()})")
    return BuildData(val, val_in, y, calib_in, selection, np.concatenate(parity_parts), qspec)


@dataclass(frozen=True)
class Exported:
    """One format's fp32 file, checked against PyTorch."""

    fmt: FormatSpec
    artifact: BuiltArtifact
    info: dict[str, Any]  # parity check + exporter facts (the report's and manifest's "export" entry)
    compute: dict[str, Any] | None


def export_stage(fmt: FormatSpec, cfg: BuildConfig, model: ModelInfo, parity_x: np.ndarray, staging: Path,
                 progress: Progress) -> Exported:
    """Export the fp32 file of ``fmt`` and check it against PyTorch on the parity images (each file gets them in
    its own input layout; PyTorch runs on the model's)."""
    from ..export.validate import torch_outputs, validate_export
    from ..runtime.compare import Tolerance

    layout = fmt.layout(cfg, model.spec)
    progress.stage(fmt.export_title(cfg, layout))
    path = staging / fmt.file_name("fp32")
    exp = fmt.export(model.module, path, model.spec, layout, cfg)
    art = BuiltArtifact(fmt.artifact_id("fp32"), path.name, fmt.name, "fp32", layout, "float32")
    parity = validate_export(model.module, fmt.name, path, relayout(parity_x, model.spec.layout, layout),
                             model.positive, Tolerance(atol=cfg.export_atol), name=art.id,
                             reference=torch_outputs(model.module, parity_x))
    progress.say(f"{parity.row()} ({progress.seconds()})")
    return Exported(fmt, art, {**parity.to_dict(), **exp.info}, exp.compute)


@dataclass(frozen=True)
class Reference:
    """The reference file's validation scores and the operating point locked on them."""

    artifact: BuiltArtifact
    scores: np.ndarray
    infer_ms: float
    threshold: float
    gating: GateSpec  # how the accuracy-aware fallbacks gate their candidates: like the final gate
    search: np.ndarray  # validation indices a fallback search selects on ...
    certify: np.ndarray  # ... and the disjoint rest, which certifies what it picked


def lock_reference(ref: BuiltArtifact, staging: Path, data: BuildData, model: ModelInfo, cfg: BuildConfig,
                   settings: BackendSettings) -> Reference:
    gdata = data.gate_data(model.spec.layout, model.positive)
    art = GateArtifact(ref.id, ref.format, ref.layout, staging / ref.path)
    scores, ms = score_artifact(art, gdata, settings)
    threshold = lock_threshold(data.labels, scores, cfg.criteria.operating_point)
    search, certify = stratified_split(data.labels, cfg.criteria.seed)
    gating = GateSpec(data.val_in.tensors, data.labels, model.positive, scores, threshold, cfg.criteria, settings,
                      search)
    return Reference(ref, scores, ms, threshold, gating, search, certify)


@dataclass(frozen=True)
class Quantized:
    """One format's int8 file with its quantization summary (the report's "quantization" entry)."""

    artifact: BuiltArtifact
    summary: dict[str, Any]
    int8_mac_fraction: float  # as recorded in the summary
    fallback: FallbackResult | None
    layer_errors: list[dict[str, Any]]


def _fallback_lines(fb: FallbackResult, progress: Progress, detail: list[dict[str, Any]]) -> None:
    """Say what the accuracy-aware fallback kept in float (and whether that left a mostly-fp32 file)."""
    if fb.excluded:
        progress.say("kept in float: " + ", ".join(f"{k['where'] or k['node']} ({k['op_type']})" for k in detail))
    if fb.mostly_float:
        progress.say(f"WARNING: only {fb.quant.int8_mac_fraction:.1%} of MACs run in int8: this model is mostly "
                     "fp32, not an int8 model")


def quantize_stage(exported: Exported, ref: Reference, data: BuildData, model_layout: str, cfg: BuildConfig,
                   staging: Path, progress: Progress, input_name: str = INPUT_NAME) -> Quantized:
    """int8 for the format of ``exported``, calibrated on the calibration images; with the accuracy-aware
    fallback (unless ``cfg.fallback`` is off), gated against the reference like the final gate."""
    fmt, fp32 = exported.fmt, exported.artifact
    progress.stage(fmt.quantize_title(cfg, len(data.calib_in.sources)))
    gating = replace(ref.gating, val_inputs=relayout(ref.gating.val_inputs, model_layout, fp32.layout))
    out = staging / fmt.file_name("int8")
    req = QuantRequest(cfg, staging / fp32.path, out, staging,
                       relayout(data.calib_in.tensors, model_layout, fp32.layout), gating, progress, input_name)
    q = fmt.quantize(req)
    summary: dict[str, Any] = {**q.result.to_dict(), "calibration_selection": data.calibration_selection,
                               "mostly_float": q.result.int8_mac_fraction < MOSTLY_FLOAT}
    if q.fallback is not None:
        summary["fallback"] = q.fallback.to_dict()
        if q.fallback.excluded:  # a search selected this file: name the images it selected on
            summary["fallback"]["search_images"] = {"n": len(ref.search), "indices": ref.search.tolist(),
                                                    "seed": cfg.criteria.seed, "split": "stratified 50/50"}
        _fallback_lines(q.fallback, progress, summary["fallback"]["kept_in_float_detail"])
    art = BuiltArtifact(fmt.artifact_id("int8"), out.name, fmt.name, "int8", fp32.layout, q.io_dtype)
    progress.say(f"{q.summary_line} ({progress.seconds()})")
    # the gate checks the MAC share as recorded (rounded) in the report and manifest, as `check` does
    return Quantized(art, summary, summary["int8_mac_fraction"], q.fallback, q.layer_errors)


def built_artifacts(exported: list[Exported], quantized: list[Quantized]) -> list[BuiltArtifact]:
    """The built files, per format (reference first): its fp32 file, then its int8 file."""
    int8 = {q.artifact.format: q.artifact for q in quantized}
    return [a for e in exported for a in (e.artifact, int8.get(e.artifact.format)) if a is not None]
