"""Inference backends behind one contract (see :mod:`.base`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import UsageError
from .base import Backend, BackendSettings

# model format -> the backend that runs it
BACKENDS_BY_FORMAT = {"onnx": "onnxruntime", "tflite": "litert"}
FORMATS_BY_BACKEND = {v: k for k, v in BACKENDS_BY_FORMAT.items()}


def create_backend(fmt: str, model_path: str | Path, settings: BackendSettings | None = None) -> Backend:
    """The backend that runs a model file of format ``fmt`` ("onnx" or "tflite")."""
    if fmt == "onnx":
        from .onnxrt import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model_path, settings)
    if fmt == "tflite":
        from .litert import LiteRTBackend

        return LiteRTBackend(model_path, settings)
    raise UsageError(f"no runtime backend for model format {fmt!r}; this runtime knows {sorted(BACKENDS_BY_FORMAT)}")


def run_backend(fmt: str, model_path: str | Path, inputs: np.ndarray,
                settings: BackendSettings | None = None) -> tuple[np.ndarray, Backend]:
    """Outputs of a model file through its runtime backend, one image at a time as on the device."""
    with create_backend(fmt, model_path, settings) as backend:
        outs = [backend.infer(np.ascontiguousarray(inputs[i : i + 1])) for i in range(len(inputs))]
    return np.concatenate(outs), backend


__all__ = ["BACKENDS_BY_FORMAT", "FORMATS_BY_BACKEND", "Backend", "BackendSettings", "create_backend",
           "run_backend"]
