"""TFLite for ``build --task segmentation``: the dense model exported by litert-torch at a fixed working size
(one tile of the dense spec, e.g. 384 x 384, batch 1, NCHW input like the runtime's tiles), checked against
PyTorch on real tiles, then int8 by the LiteRT quantizer calibrated on the same real tiles as the ONNX int8,
with float I/O and the same ops kept in float as the shipped ONNX int8 (the stem conv and the last
``OUTPUT_BLOCK`` convs: for the reference U-Net its last two decoder blocks and the head). The runtime's tiling
feeds the file one tile at a time; the segmentation gate judges both files like the ONNX ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ExportError
from ..runtime.backends import BackendSettings

if TYPE_CHECKING:
    from .build_seg import SegModel
    from .config import BuildConfig
    from .progress import Progress

OUTPUT_BLOCK = 5  # as pipeline/build_seg.float_nodes: the last two decoder blocks' convs and the head
CONVS = ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV")


def why_not(m: SegModel) -> str | None:
    """Why TFLite cannot be built for this model (None: it can)."""
    if not m.dense.tile:
        return "the dense spec has tile = 0 (whole images of any size); TFLite needs a fixed tile"
    return None


def float_scopes(path: Path) -> list[str]:
    """Op scopes kept in float: the first conv (the stem) and the last ``OUTPUT_BLOCK`` convs."""
    from ..quantization.fallback_tflite import tflite_ops

    convs = [scope for scope, op in tflite_ops(path) if op in CONVS]
    return list(dict.fromkeys([*convs[:1], *convs[-OUTPUT_BLOCK:]]))


def _parity(m: SegModel, path: Path, x: np.ndarray, cfg: BuildConfig) -> float:
    from ..export.validate import torch_outputs
    from ..runtime.backends import run_backend

    ref = torch_outputs(m.module, x, batch=4)
    got, _ = run_backend("tflite", path, x, BackendSettings(threads=cfg.threads))
    if got.shape != ref.shape:
        raise ExportError(f"the TFLite file outputs {got.shape} for {x.shape}, PyTorch {ref.shape}")
    return float(np.abs(got - ref).max())


def tflite_stage(m: SegModel, staging: Path, calib: np.ndarray, parity_x: np.ndarray, cfg: BuildConfig,
                 progress: Progress) -> dict[str, tuple[Path, dict[str, Any]]]:
    """model.fp32.tflite (parity vs PyTorch) and, with int8 asked for, model.int8.tflite (stem and output blocks
    in float, float I/O). Raises :class:`ExportError` beyond ``cfg.export_atol``."""
    from ..export.tflite import export_tflite
    from ..quantization.quantize_tflite import TfliteQuantConfig, calibrate_tflite, quantize_calibrated
    from .format_tflite import check_config

    check_config(cfg)
    t = m.dense.tile
    progress.stage(f"exporting TFLite fp32 (litert-torch, fixed {t}x{t} tile, NCHW input) and int8 (head in float)")
    fp32 = staging / "model.fp32.tflite"
    exp = export_tflite(m.module, fp32, t, "NCHW", "NCHW", channels=m.dense.channels)
    diff = _parity(m, fp32, parity_x, cfg)
    if diff > cfg.export_atol:
        raise ExportError(f"the TFLite file disagrees with PyTorch by {diff:.2e} > --export-atol {cfg.export_atol}")
    progress.say(f"TFLite fp32: parity vs PyTorch max |Δlogit| {diff:.2e} on {len(parity_x)} tiles "
                 f"({progress.seconds()})")
    out = {"tflite-fp32": (fp32, {**exp.to_dict(), "input": [1, m.dense.channels, t, t],
                                  "parity": {"tiles": {"shape": list(parity_x.shape), "max_abs_diff": diff}},
                                  "atol": cfg.export_atol})}
    if "int8" not in cfg.precisions:
        return out
    keep = float_scopes(fp32)
    qcfg = TfliteQuantConfig(io_dtype="float32", float_scopes=tuple(keep), threads=cfg.threads)
    q = quantize_calibrated(calibrate_tflite(fp32, calib, qcfg), staging / "model.int8.tflite", qcfg)
    progress.say(f"tflite-int8: int8 MAC share {q.int8_mac_fraction:.1%}, {len(keep)} convs kept in float "
                 f"({progress.seconds()})")
    out["tflite-int8"] = (q.path, {**q.to_dict(), "kept_in_float": keep, "ships": True})
    return out
