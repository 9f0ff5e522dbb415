"""``fundus-edge build``: model -> ONNX fp32 -> parity check -> int8 -> clinical gate -> verified bundle.

With ``formats`` including "tflite" (the default), the same model also goes to TFLite fp32 (litert-torch) and
full-integer int8 (ai-edge-quantizer), each checked and gated the same way (see :func:`_build_tflite`).

Every artifact is evaluated from the file that ships, through the runtime's backend. Work happens in a
staging directory next to ``out``; the bundle appears (atomically renamed) only when the gate passes, or
when ``allow_failed_gate`` is set, in which case the manifest says the gate failed.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

import numpy as np

from .. import __version__
from ..bundle.read import sha256_file, write_manifest
from ..datasets.labels import LabelledSet, list_images, read_labels
from ..errors import GateFailedError, MissingDependencyError, UsageError
from ..gate.gate import GateCriteria, GateResult, evaluate, gate
from ..gate.metrics import lock_threshold
from ..gate.quality_gate import manifest_summary, quality_summary
from ..gate.report import write_reports
from ..quantization.calibration import PreparedInputs, prepare_inputs, select_calibration
from ..quantization.fallback import FallbackBudget, GateSpec
from ..runtime.backends import BackendSettings, run_backend
from ..runtime.postprocess import referable_probability
from ..runtime.preprocess import PreprocessSpec, relayout
from ..runtime.quality import QualitySpec

FORMATS = ("onnx", "tflite")

Log = Callable[[str], None]


@dataclass
class BuildConfig:
    model: str  # path, or "reference:<name>"
    out: Path
    calib: Path | None = None
    val: Path | None = None
    val_images: Path | None = None
    arch: str | None = None
    num_classes: int | None = None
    name: str | None = None
    class_names: list[str] | None = None
    positive_classes: list[int] | None = None
    referable_from: int = 2
    preprocessing: PreprocessSpec | None = None
    calib_size: int = 128
    calib_seed: int = 0
    exporter: str = "dynamo"
    export_atol: float = 1e-3
    parity_images: list[Path] = field(default_factory=list)
    precisions: tuple[str, ...] = ("fp32", "int8")
    formats: tuple[str, ...] = FORMATS  # "onnx" always comes first: its fp32 file locks the operating point
    tflite_layout: str = "NHWC"  # input layout of the .tflite files (NHWC: what TFLite kernels compute in)
    tflite_int8_io: str = "int8"  # I/O tensors of the int8 .tflite: "int8" (full-integer I/O) or "float32"
    criteria: GateCriteria = field(default_factory=GateCriteria)
    calibrator: str = "minmax"
    exclude_nodes: list[str] = field(default_factory=list)
    fallback: bool = True
    fallback_budget: FallbackBudget = field(default_factory=FallbackBudget)
    debug_layers: bool = True
    allow_failed_gate: bool = False
    force: bool = False
    threads: int = 0
    quality: QualitySpec | None = None  # the bundle's image-quality spec (None: the built-in defaults)
    device: str | None = None  # a device profile: picks the default artifact, recorded in the manifest
    # Sign manifest.json with this Ed25519 private key (runtime/signing.py); the passphrase is never printed.
    sign_key: Path | None = None
    sign_key_passphrase: bytes | None = field(default=None, repr=False)


@dataclass
class BuildResult:
    out: Path | None
    manifest: dict[str, Any] | None
    report: dict[str, Any]
    gate_passed: bool
    report_dir: Path
    signed_by: str | None = None  # key id of the signature in manifest.sig


def _stage(log: Log, i: int, n: int, text: str) -> float:
    log(f"[{i}/{n}] {text}")
    return time.perf_counter()


def _progress(log: Log, what: str) -> Callable[[int, int], None]:
    step = [0]

    def cb(done: int, total: int) -> None:
        pct = done * 10 // max(total, 1)
        if pct > step[0] or done == total:
            step[0] = pct
            log(f"      {what}: {done}/{total}")

    return cb


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


def _check_tflite_config(cfg: BuildConfig) -> None:
    import importlib.util

    if cfg.formats not in (("onnx",), ("onnx", "tflite")):
        raise UsageError(f"--formats is onnx or onnx,tflite (the ONNX fp32 file is the reference), got "
                         f"{','.join(cfg.formats) or 'nothing'}")
    if "tflite" not in cfg.formats:
        return
    if cfg.tflite_layout not in ("NHWC", "NCHW"):
        raise UsageError(f"--tflite-layout is NHWC or NCHW, got {cfg.tflite_layout!r}")
    if cfg.tflite_int8_io not in ("int8", "float32"):
        raise UsageError(f"--tflite-int8-io is int8 or float32, got {cfg.tflite_int8_io!r}")
    for module, dist in (("litert_torch", "litert-torch"), ("ai_edge_quantizer", "ai-edge-quantizer"),
                         ("ai_edge_litert", "ai-edge-litert")):
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(dist, "export", "Building TFLite artifacts (--formats ...,tflite)")


@dataclass
class _TfliteStage:
    """What the TFLite export and quantization stages produced."""

    artifacts: list[dict[str, Any]]
    export: dict[str, Any]
    quantization: dict[str, Any]
    scores: dict[str, np.ndarray]  # validation scores already computed (by the fallback loop)


def _fallback_report(fb: Any, say: Log) -> dict[str, Any]:
    """Say what the accuracy-aware fallback kept in float (and whether that left a mostly-fp32 file)."""
    report: dict[str, Any] = fb.to_dict()
    if fb.excluded:
        say("      kept in float: " + ", ".join(f"{k['where'] or k['node']} ({k['op_type']})"
                                                for k in report["kept_in_float_detail"]))
    if fb.mostly_float:
        say(f"      WARNING: only {fb.quant.int8_mac_fraction:.1%} of MACs run in int8: this model is mostly fp32, "
            "not an int8 model")
    return report


def _build_tflite(cfg: BuildConfig, module: Any, spec: PreprocessSpec, staging: Path, parity_x: np.ndarray,
                  calib: PreparedInputs, calib_selection: dict[str, Any], positive: list[int], say: Log,
                  step: Callable[[str], float], gating: GateSpec) -> _TfliteStage:
    """TFLite fp32 (litert-torch) with parity vs PyTorch, then full-integer int8 (ai-edge-quantizer), with the
    accuracy-aware per-op fallback when the int8 file fails the gate (unless ``cfg.fallback`` is off)."""
    from ..export.tflite import export_tflite
    from ..export.validate import torch_outputs, validate_export
    from ..quantization.fallback import MOSTLY_FLOAT
    from ..quantization.fallback_tflite import accuracy_aware_quantize_tflite
    from ..quantization.quantize_tflite import (
        TfliteQuantConfig,
        TfliteQuantResult,
        calibrate_tflite,
        quantize_calibrated,
    )
    from ..runtime.compare import Tolerance

    layout = cfg.tflite_layout
    t = step(f"exporting TFLite fp32 (litert-torch, {layout} input) and checking parity")
    fp32_path = staging / "model.fp32.tflite"
    exp = export_tflite(module, fp32_path, spec.size, model_layout=spec.layout, layout=layout)
    # PyTorch runs on the model's own layout; the file gets the same images in its layout
    parity = validate_export(module, "tflite", fp32_path, relayout(parity_x, spec.layout, layout), positive,
                             Tolerance(atol=cfg.export_atol), name="tflite-fp32",
                             reference=torch_outputs(module, parity_x))
    say(f"      {parity.row()} ({time.perf_counter() - t:.1f}s)")
    artifacts: list[dict[str, Any]] = [{"id": "tflite-fp32", "path": fp32_path.name, "format": "tflite",
                                        "precision": "fp32", "layout": layout, "io_dtype": "float32"}]
    quant: dict[str, Any] = {}
    scores: dict[str, np.ndarray] = {}
    if "int8" in cfg.precisions:
        t = step(f"quantizing TFLite to full-integer int8 ({cfg.tflite_int8_io} I/O, global min/max) on "
                 f"{len(calib.sources)} calibration images"
                 + (", accuracy-aware per-op fallback on" if cfg.fallback else ""))
        int8_path = staging / "model.int8.tflite"
        qcfg = TfliteQuantConfig(io_dtype=cfg.tflite_int8_io, threads=cfg.threads)
        calib_x = relayout(calib.tensors, spec.layout, layout)
        cal = calibrate_tflite(fp32_path, calib_x, qcfg)
        if cfg.fallback:
            fb = accuracy_aware_quantize_tflite(
                cal, int8_path, calib_x, replace(gating, val_inputs=relayout(gating.val_inputs, spec.layout, layout)),
                qcfg, cfg.fallback_budget, log=say)
            q = cast(TfliteQuantResult, fb.quant)  # what the TFLite target writes
            scores["tflite-int8"] = fb.scores
            report = _fallback_report(fb, say)
        else:
            q = quantize_calibrated(cal, int8_path, qcfg)
            report = None
        quant["tflite-int8"] = {**q.to_dict(), "calibration_selection": calib_selection,
                                "mostly_float": q.int8_mac_fraction < MOSTLY_FLOAT,
                                **({"fallback": report} if report is not None else {})}
        artifacts.append({"id": "tflite-int8", "path": int8_path.name, "format": "tflite", "precision": "int8",
                          "layout": layout, "io_dtype": q.coverage.input_dtype})
        say(f"      {q.coverage.summary()} ({time.perf_counter() - t:.1f}s)")
    return _TfliteStage(artifacts, {"tflite-fp32": {**parity.to_dict(), **exp.to_dict()}}, quant, scores)


def run_build(cfg: BuildConfig, log: Log | None = None) -> BuildResult:
    """Run the whole build. Raises :class:`GateFailedError` when the gate fails (unless allowed)."""
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("torch", "export", "Building a bundle") from exc
    _check_tflite_config(cfg)
    from ..export.load import load_model
    from ..export.onnx import INPUT_NAME, export_onnx
    from ..export.validate import torch_outputs, validate_export
    from ..quantization.debug import layer_errors
    from ..quantization.fallback import MOSTLY_FLOAT, accuracy_aware_quantize
    from ..quantization.quantize_onnx import (
        OnnxQuantConfig,
        OnnxQuantResult,
        count_macs,
        preprocess_for_quantization,
        quantize_onnx,
    )
    from ..runtime.compare import Tolerance

    say: Log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = cfg.out
    if cfg.calib is None or cfg.val is None:
        raise UsageError("build needs --calib (a folder of fundus images) and --val (a labels CSV)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory; choose another --out")
    if cfg.device:
        from ..devices.profile import get_profile

        get_profile(cfg.device)  # an unknown device fails now, not after the build
    if out.exists() and any(out.iterdir()) and not cfg.force:
        raise UsageError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")
    signer = None
    if cfg.sign_key is not None:  # load (and check) the key first: a bad key must not cost a whole build
        if cfg.allow_failed_gate:
            raise UsageError("--sign-key cannot be combined with --allow-failed-gate: a signature is the "
                             "publisher's approval to run the bundle, and a bundle that fails the gate is not "
                             "approved")
        from ..bundle.signing import load_signing_key

        signer = load_signing_key(cfg.sign_key, cfg.sign_key_passphrase)
    n_tflite = ("tflite" in cfg.formats) * (1 + ("int8" in cfg.precisions))
    n_steps = 6 + n_tflite
    t = _stage(say, 1, n_steps, f"loading model {cfg.model}")
    loaded = load_model(cfg.model, cfg.arch, cfg.num_classes)
    meta = loaded.meta
    spec = cfg.preprocessing or (PreprocessSpec.from_dict(meta["preprocessing"]) if "preprocessing" in meta
                                 else PreprocessSpec())
    num_classes = loaded.num_classes or int(meta.get("num_classes", 0)) or None
    class_names = cfg.class_names or meta.get("class_names")
    positive = cfg.positive_classes or meta.get("positive_classes")
    probe_shape = (1, 3, spec.size, spec.size) if spec.layout == "NCHW" else (1, spec.size, spec.size, 3)
    probe = torch_outputs(loaded.module, np.zeros(probe_shape, np.float32))
    n_out = probe.shape[-1]
    if num_classes and num_classes != n_out:
        raise UsageError(f"--num-classes {num_classes} but the model outputs {n_out} values")
    if class_names is None:
        class_names = ["referable"] if n_out == 1 else (
            ["no-referable", "referable"] if n_out == 2 else [f"grade-{i}" for i in range(n_out)])
    if positive is None:
        positive = [0] if n_out == 1 else ([1] if n_out == 2 else list(range(cfg.referable_from, n_out)))
    if len(class_names) != n_out:
        raise UsageError(f"{len(class_names)} class names for a model with {n_out} outputs")
    say(f"      {loaded.source}: {n_out} outputs, referable classes {positive} ({time.perf_counter() - t:.1f}s)")

    t = _stage(say, 2, n_steps, "preprocessing calibration and validation images (runtime preprocessing)")
    val: LabelledSet = read_labels(cfg.val, cfg.val_images, cfg.referable_from)
    for p in val.problems[:5]:
        say(f"      skipped: {p}")
    if len(val.problems) > 5:
        say(f"      ... {len(val.problems) - 5} more skipped rows (all listed in report.json)")
    qspec = cfg.quality or QualitySpec()
    val_in = prepare_inputs(val.paths, spec, _progress(say, "validation"), quality=qspec if qspec.enabled else None)
    kept = {s: i for i, s in enumerate(map(str, val.paths))}
    y = np.array([val.referable[kept[s]] for s in val_in.sources], dtype=int)
    calib_files = list_images(cfg.calib)
    pick = select_calibration(len(calib_files), cfg.calib_size, cfg.calib_seed)
    calib_in = prepare_inputs([calib_files[i] for i in pick], spec, _progress(say, "calibration"))
    parity_in: PreparedInputs | None = prepare_inputs(cfg.parity_images, spec) if cfg.parity_images else None
    say(f"      {len(val_in.sources)} validation ({int(y.sum())} referable), {len(calib_in.sources)} calibration "
        f"images ({time.perf_counter() - t:.1f}s)")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        t = _stage(say, 3, n_steps, f"exporting ONNX fp32 ({cfg.exporter} exporter) and checking parity")
        fp32_path = staging / "model.fp32.onnx"
        exp = export_onnx(loaded.module, fp32_path, spec.size, spec.layout, cfg.exporter)
        # MACs of one inference, for device projections on the runtime side (which has no onnx package)
        compute = {**count_macs(fp32_path), "input_size": spec.size}
        parity_parts = [val_in.tensors[:24], calib_in.tensors[:8]]
        if parity_in is not None:
            parity_parts.append(parity_in.tensors)
        parity_x = np.concatenate(parity_parts)
        tol = Tolerance(atol=cfg.export_atol)
        parity = validate_export(loaded.module, "onnx", fp32_path, parity_x, positive, tol, name="onnx-fp32")
        say(f"      {parity.row()} ({time.perf_counter() - t:.1f}s)")

        artifacts: list[dict[str, Any]] = [{"id": "onnx-fp32", "path": fp32_path.name, "format": "onnx",
                                             "precision": "fp32", "layout": spec.layout, "io_dtype": "float32"}]
        quant_summary: dict[str, Any] = {}
        fallback_report: dict[str, Any] | None = None
        layer_report: list[dict[str, Any]] = []
        settings = BackendSettings(threads=cfg.threads)
        scores: dict[str, np.ndarray] = {}
        infer_ms: dict[str, float] = {}

        def score(artifact_id: str, fmt: str, path: Path, layout: str = spec.layout) -> None:
            x = relayout(val_in.tensors, spec.layout, layout)  # each file gets the images in its own layout
            logits, backend = run_backend(fmt, path, x, settings)
            scores[artifact_id] = referable_probability(logits, positive)
            infer_ms[artifact_id] = float(np.mean(backend.timings.infer_ms))

        score("onnx-fp32", "onnx", fp32_path)
        threshold = lock_threshold(y, scores["onnx-fp32"], cfg.criteria.operating_point)
        # how the accuracy-aware fallbacks gate their candidates: like the final gate, against onnx-fp32
        gating = GateSpec(val_in.tensors, y, positive, scores["onnx-fp32"], threshold, cfg.criteria, settings)
        if "int8" in cfg.precisions:
            t = _stage(say, 4, n_steps, f"quantizing to int8 (QDQ, per-channel, u8/s8, {cfg.calibrator}) on "
                                        f"{len(calib_in.sources)} calibration images"
                                        + (", accuracy-aware fallback on" if cfg.fallback else ""))
            int8_path = staging / "model.int8.onnx"
            pre = preprocess_for_quantization(fp32_path, staging / "pre.onnx")
            qcfg = OnnxQuantConfig(calibrator=cfg.calibrator, nodes_to_exclude=tuple(cfg.exclude_nodes))
            if cfg.fallback:
                fb = accuracy_aware_quantize(fp32_path, pre, int8_path, calib_in.tensors, gating, INPUT_NAME, qcfg,
                                             cfg.fallback_budget, log=say)
                q = cast(OnnxQuantResult, fb.quant)  # what the ONNX target writes
                scores["onnx-int8"] = fb.scores
                fallback_report = _fallback_report(fb, say)
            else:
                q = quantize_onnx(fp32_path, int8_path, calib_in.tensors, INPUT_NAME, qcfg,
                                  cache_path=staging / "calibration.json", preprocessed=pre)
            if cfg.debug_layers:
                layer_report = [e.to_dict() for e in layer_errors(pre, int8_path, calib_in.tensors, INPUT_NAME)]
            pre.unlink()
            (staging / "calibration.json").unlink(missing_ok=True)
            quant_summary["onnx-int8"] = {**q.to_dict(), "calibration_selection": {
                "from": str(cfg.calib), "available": len(calib_files), "requested": cfg.calib_size,
                "used": len(calib_in.sources), "seed": cfg.calib_seed, "method": "seeded random subset"},
                "mostly_float": q.int8_mac_fraction < MOSTLY_FLOAT}
            if fallback_report is not None:
                quant_summary["onnx-int8"]["fallback"] = fallback_report
            artifacts.append({"id": "onnx-int8", "path": int8_path.name, "format": "onnx", "precision": "int8",
                              "layout": spec.layout, "io_dtype": "float32"})
            say(f"      int8 MAC share {q.int8_mac_fraction:.1%}, quantized ops {q.quantized_ops} "
                f"({time.perf_counter() - t:.1f}s)")
        else:
            _stage(say, 4, n_steps, "int8 not requested; skipping quantization")
        export_info: dict[str, Any] = {"onnx-fp32": {**parity.to_dict(), **exp.to_dict()}}
        if "tflite" in cfg.formats:
            step_no = [4]

            def step(text: str) -> float:
                step_no[0] += 1
                return _stage(say, step_no[0], n_steps, text)

            selection = {"from": str(cfg.calib), "available": len(calib_files), "requested": cfg.calib_size,
                         "used": len(calib_in.sources), "seed": cfg.calib_seed, "method": "seeded random subset"}
            tfl = _build_tflite(cfg, loaded.module, spec, staging, parity_x, calib_in, selection, positive, say, step,
                                gating)
            scores.update(tfl.scores)
            artifacts += tfl.artifacts
            export_info.update(tfl.export)
            quant_summary.update(tfl.quantization)

        t = _stage(say, 5 + n_tflite, n_steps, "clinical gate: evaluating the shipped files through the runtime "
                   "backends")
        for a in artifacts:
            if a["id"] not in scores:
                score(a["id"], a["format"], staging / a["path"], a["layout"])
            if a["id"] not in infer_ms:
                x16 = relayout(val_in.tensors[:16], spec.layout, a["layout"])
                _, backend = run_backend(a["format"], staging / a["path"], x16, settings)
                infer_ms[a["id"]] = float(np.mean(backend.timings.infer_ms))
            a["mean_infer_ms"] = infer_ms[a["id"]]
            a["bytes"] = (staging / a["path"]).stat().st_size
        ref_id = "onnx-fp32"
        gradable = val_in.gradable
        ref_eval = evaluate(ref_id, y, scores[ref_id], threshold, cfg.criteria)
        gates: list[GateResult] = [gate(a["id"], y, scores[ref_id], scores[a["id"]], threshold, cfg.criteria,
                                        ref_id, ref_eval, quant_summary.get(a["id"], {}).get("int8_mac_fraction"))
                                   for a in artifacts if a["id"] != ref_id]
        for g in gates:
            say(f"      {g.artifact}: AUC {g.candidate_eval.auc:.4f} (Δ {g.delta_auc:+.4f}), sensitivity "
                f"{g.candidate_eval.sensitivity:.4f} (Δ {g.delta_sensitivity:+.4f}), flips {g.flips} -> "
                f"{'PASS' if g else 'FAIL: ' + '; '.join(g.failures)}")
        quality_rep: dict[str, Any] | None = None
        if gradable is not None and val_in.quality is not None:
            quality_rep = quality_summary(y, gradable, scores, threshold, cfg.criteria, val_in.quality,
                                          val_in.sources, qspec.source, ref_id)
            say(f"      image quality: {quality_rep['n_ungradable']}/{len(y)} validation images ungradable "
                f"({quality_rep['ungradable_rate']:.1%}); gradable-only sensitivity "
                + ", ".join(f"{k} {v['sensitivity']:.4f}" for k, v in quality_rep["gradable"].items()
                            if v.get("sensitivity") is not None))
        gate_passed = all(gates)
        say(f"      reference {ref_id}: AUC {ref_eval.auc:.4f} ({ref_eval.auc_ci[0]:.3f}-{ref_eval.auc_ci[1]:.3f}), "
            f"threshold {threshold:.4f}, sensitivity {ref_eval.sensitivity:.4f}, specificity "
            f"{ref_eval.specificity:.4f} ({time.perf_counter() - t:.1f}s)")
        for a in artifacts:
            g_match = next((g for g in gates if g.artifact == a["id"]), None)
            a["gate"] = g_match.to_dict() if g_match is not None else {"passed": export_info[ref_id]["passed"],
                                                                       "role": "reference",
                                                           "auc": ref_eval.auc, "sensitivity": ref_eval.sensitivity,
                                                           "specificity": ref_eval.specificity}
        report: dict[str, Any] = {
            "name": cfg.name or Path(loaded.source).stem,
            "gate_passed": gate_passed,
            "allow_failed_gate": cfg.allow_failed_gate,
            "criteria": cfg.criteria.to_dict(),
            "operating_point": {"threshold": threshold, "rule": cfg.criteria.operating_point, "locked_on": ref_id},
            "reference": ref_eval.to_dict(),
            "gates": [g.to_dict() for g in gates],
            "confusion": {ref_id: ref_eval.confusion, **{g.artifact: g.candidate_eval.confusion for g in gates}},
            "export": export_info,
            "quantization": quant_summary,
            "layer_errors": layer_report,
            "artifacts": [{k: a[k] for k in ("id", "path", "bytes", "mean_infer_ms")} for a in artifacts],
            "validation": {"csv": str(cfg.val), "layout": val.layout, "n": len(val_in.sources),
                           "problems": val.problems + [f"{s['source']}: {s['message']}" for s in val_in.skipped]},
            "scores": {k: [float(v) for v in s] for k, s in scores.items()},
            "labels": y.tolist(),
        }
        if quality_rep is not None:
            report["quality"] = quality_rep
            report["gradable"] = gradable.tolist() if gradable is not None else None

        t = _stage(say, n_steps, n_steps, "writing bundle" if gate_passed or cfg.allow_failed_gate else
                   "gate failed: writing the report only")
        if not gate_passed and not cfg.allow_failed_gate:
            report_dir = out.parent / f"{out.name}.gate-failed"
            shutil.rmtree(report_dir, ignore_errors=True)
            write_reports(report_dir, report)
            failures = "; ".join(f"{g.artifact}: {', '.join(g.failures)}" for g in gates if not g)
            for q_id, q_info in quant_summary.items():
                fb_rep = q_info.get("fallback")
                g_fb = next((g for g in gates if g.artifact == q_id), None)
                if fb_rep is None or g_fb is None or g_fb.passed or len(fb_rep["steps"]) < 2:
                    continue
                failures += (f". {q_id}: the fallback tried {len(fb_rep['steps']) - 1} candidate(s); the best kept "
                             f"{len(fb_rep['excluded_nodes'])} node(s) in float "
                             f"({fb_rep['int8_mac_fraction']:.1%} of MACs int8): ΔAUC {g_fb.delta_auc:+.4f}, "
                             f"Δsensitivity {g_fb.delta_sensitivity:+.4f}, flips {g_fb.flips}")
            raise GateFailedError(
                f"clinical gate failed ({failures}); no bundle written. Report: {report_dir}/report.md. "
                "Fix the model or calibration, relax the gate deliberately, or pass --allow-failed-gate"
                + ("; if int8 cannot hold the gate on this model, ship fp32 only with --precisions fp32"
                   if any(q.get("fallback") and not q["fallback"]["passed"] for q in quant_summary.values()) else "")
            )
        report_files = write_reports(staging, report)
        default = "onnx-int8" if gate_passed and any(a["id"] == "onnx-int8" for a in artifacts) else "onnx-fp32"
        device_entry = None
        if cfg.device:
            from ..devices.build_target import device_default

            default, device_entry = device_default(cfg.device, artifacts, gates, default, say)
        digest = hashlib.sha256()
        for a in artifacts:
            a["sha256"] = sha256_file(staging / a["path"])
            digest.update(bytes.fromhex(a["sha256"]))
        name = cfg.name or report["name"]
        manifest: dict[str, Any] = {
            "bundle_id": f"{name}-{digest.hexdigest()[:12]}",
            "name": name,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {"source": loaded.source, "arch": loaded.arch or meta.get("arch"), "num_outputs": n_out,
                      "class_names": class_names, "positive_classes": positive,
                      "referable_rule": f"grade >= {cfg.referable_from}", "training": meta.get("training")},
            "input": {"name": INPUT_NAME, "shape": ["batch", *([3, spec.size, spec.size] if spec.layout == "NCHW"
                                                               else [spec.size, spec.size, 3])],
                      "dtype": "float32", "layout": spec.layout},
            "output": {"name": "logits", "shape": ["batch", n_out], "dtype": "float32", "kind": "logits"},
            "preprocessing": spec.to_dict(),
            "operating_point": {"threshold": threshold, "rule": cfg.criteria.operating_point, "locked_on": ref_id,
                                "sensitivity": ref_eval.sensitivity, "specificity": ref_eval.specificity},
            "artifacts": [{k: v for k, v in a.items() if k not in ("mean_infer_ms", "bytes")} for a in artifacts],
            "default_artifact": default,
            "gate": {"passed": gate_passed, "allow_failed_gate": cfg.allow_failed_gate,
                     "criteria": cfg.criteria.to_dict(), "n_validation": len(y),
                     "summary": {g.artifact: {"passed": g.passed, "delta_auc": g.delta_auc,
                                              "delta_sensitivity": g.delta_sensitivity, "flips": g.flips}
                                 for g in gates},
                     **({"quality": manifest_summary(quality_rep)} if quality_rep else {})},
            "quality": qspec.to_dict(),
            "quantization": quant_summary,
            "export": export_info,
            "compute": compute,
            "producer": producer_versions(),
            **({"device": device_entry} if device_entry else {}),
            "files": [a["path"] for a in artifacts] + [str(p.relative_to(staging)) for p in report_files],
        }
        write_manifest(staging, manifest)
        if signer is not None:
            from ..bundle.signing import sign_bundle

            sign_bundle(staging, signer)
            say(f"      signed manifest.json with key {signer.key_id} -> manifest.sig")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
        say(f"      bundle {manifest['bundle_id']} -> {out} ({time.perf_counter() - t:.1f}s)")
        from ..bundle.read import load_bundle

        written = load_bundle(out).manifest
        signed_by = None
        if signer is not None:
            from ..bundle.signing import check_signature

            signed_by = check_signature(out, {signer.key_id: signer.public_key()}, require=True).key_id
        return BuildResult(out, written, report, gate_passed, out, signed_by=signed_by)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
