"""The TFLite format on the toolchain side: litert-torch export and ai-edge-quantizer full-integer int8 (with
the accuracy-aware per-op fallback). The converters are imported only when a build runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, cast

from ..errors import MissingDependencyError, UsageError
from ..runtime.preprocess import PreprocessSpec
from .artifacts import ExportedFile, QuantizedFile, QuantRequest
from .config import BuildConfig

REQUIRES = (("litert_torch", "litert-torch"), ("ai_edge_litert", "ai-edge-litert"))


def check_config(cfg: BuildConfig) -> None:
    if cfg.tflite_layout not in ("NHWC", "NCHW"):
        raise UsageError(f"--tflite-layout is NHWC or NCHW, got {cfg.tflite_layout!r}")
    if cfg.tflite_int8_io not in ("int8", "float32"):
        raise UsageError(f"--tflite-int8-io is int8 or float32, got {cfg.tflite_int8_io!r}")
    from ..quantization.quantize_tflite import QUANTIZER_PACKAGES

    brought = str(cfg.model).lower().endswith(".tflite")  # a brought .tflite file is the fp32 one: no exporter
    for module, dist in REQUIRES[1:] if brought else REQUIRES:
        if importlib.util.find_spec(module) is None:
            raise MissingDependencyError(dist, "quantize-tflite" if brought else "export",
                                         "Building TFLite artifacts (--formats ...,tflite)")
    if "int8" in cfg.precisions and not any(importlib.util.find_spec(m) for m, _ in QUANTIZER_PACKAGES):
        raise MissingDependencyError(QUANTIZER_PACKAGES[0][1], "quantize-tflite" if brought else "export",
                                     "TFLite int8 quantization")


def export(module: Any, path: Path, spec: PreprocessSpec, layout: str, cfg: BuildConfig) -> ExportedFile:
    from ..export.tflite import export_tflite

    return ExportedFile(export_tflite(module, path, spec.size, model_layout=spec.layout, layout=layout).to_dict())


def export_title(cfg: BuildConfig, layout: str) -> str:
    return f"exporting TFLite fp32 (litert-torch, {layout} input) and checking parity"


def quantize_title(cfg: BuildConfig, n_calibration: int) -> str:
    return (f"quantizing TFLite to full-integer int8 ({cfg.tflite_int8_io} I/O, global min/max) on "
            f"{n_calibration} calibration images" + (", accuracy-aware per-op fallback on" if cfg.fallback else ""))


def quantize(req: QuantRequest) -> QuantizedFile:
    from ..quantization.fallback_tflite import accuracy_aware_quantize_tflite
    from ..quantization.quantize_tflite import (
        TfliteQuantConfig,
        TfliteQuantResult,
        calibrate_tflite,
        quantize_calibrated,
    )

    cfg = req.cfg
    qcfg = TfliteQuantConfig(io_dtype=cfg.tflite_int8_io, threads=cfg.threads)
    cal = calibrate_tflite(req.fp32, req.calibration, qcfg)
    fb = None
    if cfg.fallback:
        fb = accuracy_aware_quantize_tflite(cal, req.out, req.calibration, req.gating, qcfg, cfg.fallback_budget,
                                            log=req.progress.log)
        q = cast(TfliteQuantResult, fb.quant)  # what the TFLite target writes
    else:
        q = quantize_calibrated(cal, req.out, qcfg)
    return QuantizedFile(q, q.coverage.input_dtype, q.coverage.summary(), fb)
