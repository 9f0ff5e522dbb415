"""``fundus-edge build``: model -> fp32 file per format (parity-checked) -> int8 per format -> clinical gate ->
verified bundle.

Formats come from the registry in :mod:`.formats` (ONNX, the reference, and TFLite by default). Every artifact
is evaluated from the file that ships, through the runtime's backend (the gate stage ``check`` runs too, in
:mod:`..gate.stage`). Work happens in a staging directory next to ``out``; the bundle appears (atomically
renamed) only when the gate passes, or when ``allow_failed_gate`` is set, in which case the manifest says the
gate failed. The stages are in :mod:`.stages`, :mod:`.build_gate` and :mod:`.bundle_stage`.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from ..errors import UsageError
from ..runtime.backends import BackendSettings
from .build_gate import build_gate_stage
from .bundle_stage import Built, make_report, producer_versions, write_bundle_stage
from .config import FORMATS, BuildConfig, BuildResult
from .formats import FormatSpec, build_formats
from .intake import ModelStage, model_stage
from .progress import Log, Progress, stderr_log
from .stages import built_artifacts, lock_reference, prepare_data_stage, quantize_stage


def _check_request(cfg: BuildConfig, stage: ModelStage) -> tuple[list[FormatSpec], Any]:
    """Everything that can be checked before any work: the model stage's needs, formats, inputs, output folder,
    device, signing key. Returns the formats to build and the loaded signing key (or None)."""
    stage.check(cfg)
    formats = build_formats(cfg, stage.reference_format)
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
    if cfg.sign_key is None:
        return formats, None
    if cfg.allow_failed_gate:  # load (and check) the key first: a bad key must not cost a whole build
        raise UsageError("--sign-key cannot be combined with --allow-failed-gate: a signature is the publisher's "
                         "approval to run the bundle, and a bundle that fails the gate is not approved")
    from ..bundle.signing import load_signing_key

    return formats, load_signing_key(cfg.sign_key, cfg.sign_key_passphrase)


def n_stages(n_formats: int, int8: bool) -> int:
    """load, prepare, (export [+ quantize]) per format, gate, write."""
    return 4 + n_formats * (1 + int8)


def run_build(cfg: BuildConfig, log: Log | None = None) -> BuildResult:
    """Run the whole build. Raises :class:`GateFailedError` when the gate fails (unless allowed)."""
    stage = model_stage(cfg.model)
    formats, signer = _check_request(cfg, stage)
    if cfg.task != "classification" and stage.kind == "pytorch":
        from .build_seg import route_task

        routed = route_task(cfg, signer, log)
        if routed is not None:
            return routed
    int8 = "int8" in cfg.precisions
    progress = Progress(log or stderr_log, n_stages(len(formats), int8))
    model = stage.load(cfg, progress)
    data = prepare_data_stage(cfg, model.spec, progress)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    staging = cfg.out.parent / f".{cfg.out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        settings = BackendSettings(threads=cfg.threads)
        exported = [stage.export(f, cfg, model, data.parity_x, staging, progress) for f in formats]
        reference = lock_reference(exported[0].artifact, staging, data, model, cfg, settings)
        quantized = [quantize_stage(e, reference, data, model.spec.layout, cfg, staging, progress, model.input_name)
                     for e in exported] if int8 else []
        gate = build_gate_stage(built_artifacts(exported, quantized), staging,
                                data.gate_data(model.spec.layout, model.positive), reference, quantized, settings,
                                progress)
        built = Built(cfg, model, data, exported, quantized, reference, gate)
        report = make_report(built)
        written = write_bundle_stage(built, report, staging, signer, progress)
        return BuildResult(written.out, written.manifest, report, built.gate.passed, written.out,
                           signed_by=written.signed_by)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["FORMATS", "BuildConfig", "BuildResult", "producer_versions", "run_build"]
