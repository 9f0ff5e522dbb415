"""The ONNX format on the toolchain side: torch.onnx export and onnxruntime's QDQ int8 quantizer (with the
accuracy-aware fallback). Torch and onnx are imported only when a build runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

from ..runtime.preprocess import PreprocessSpec
from .artifacts import ExportedFile, QuantizedFile, QuantRequest
from .config import BuildConfig


def export(module: Any, path: Path, spec: PreprocessSpec, layout: str, cfg: BuildConfig) -> ExportedFile:
    from ..export.onnx import export_onnx
    from ..quantization.quantize_onnx import count_macs

    exp = export_onnx(module, path, spec.size, layout, cfg.exporter)
    # MACs of one inference, for device projections on the runtime side (which has no onnx package)
    return ExportedFile(exp.to_dict(), compute={**count_macs(path), "input_size": spec.size})


def export_title(cfg: BuildConfig, layout: str) -> str:
    return f"exporting ONNX fp32 ({cfg.exporter} exporter) and checking parity"


def quantize_title(cfg: BuildConfig, n_calibration: int) -> str:
    return (f"quantizing to int8 (QDQ, per-channel, u8/s8, {cfg.calibrator}) on {n_calibration} calibration images"
            + (", accuracy-aware fallback on" if cfg.fallback else ""))


def quantize(req: QuantRequest) -> QuantizedFile:
    from ..quantization.debug import layer_errors
    from ..quantization.fallback import accuracy_aware_quantize
    from ..quantization.quantize_onnx import (
        OnnxQuantConfig,
        OnnxQuantResult,
        preprocess_for_quantization,
        quantize_onnx,
    )

    cfg, input_name = req.cfg, req.input_name
    pre = preprocess_for_quantization(req.fp32, req.staging / "pre.onnx")
    qcfg = OnnxQuantConfig(calibrator=cfg.calibrator, nodes_to_exclude=tuple(cfg.exclude_nodes))
    fb = None
    if cfg.fallback:
        fb = accuracy_aware_quantize(req.fp32, pre, req.out, req.calibration, req.gating, input_name, qcfg,
                                     cfg.fallback_budget, log=req.progress.log)
        q = cast(OnnxQuantResult, fb.quant)  # what the ONNX target writes
    else:
        q = quantize_onnx(req.fp32, req.out, req.calibration, input_name, qcfg,
                          cache_path=req.staging / "calibration.json", preprocessed=pre)
    layers = ([e.to_dict() for e in layer_errors(pre, req.out, req.calibration, input_name)]
              if cfg.debug_layers else [])
    pre.unlink()
    (req.staging / "calibration.json").unlink(missing_ok=True)
    return QuantizedFile(q, "float32", f"int8 MAC share {q.int8_mac_fraction:.1%}, quantized ops {q.quantized_ops}",
                         fb, layers)
