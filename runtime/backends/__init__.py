"""Inference backends behind one contract (see :mod:`.base`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ...errors import UsageError
from .base import Backend, BackendSettings

# model format -> the backend that runs it
BACKENDS_BY_FORMAT = {"onnx": "onnxruntime", "tflite": "litert"}
FORMATS_BY_BACKEND = {v: k for k, v in BACKENDS_BY_FORMAT.items()}
# model format -> the top-level packages any one of which lets its backend run (as tried by .onnxrt / .litert)
BACKEND_PACKAGES = {"onnx": ("onnxruntime",), "tflite": ("ai_edge_litert", "tflite_runtime", "tensorflow")}
# model format -> the fundus-edge extra that installs its backend
EXTRA_FOR_FORMAT = {"onnx": "onnx", "tflite": "litert"}


def package_installed(name: str) -> bool:
    """Whether the top-level package ``name`` is installed here (found without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def installed_formats() -> set[str]:
    """Model formats whose backend package is installed here: the artifacts this runtime can choose among.

    Cheap (``importlib.util.find_spec``; nothing is imported). ``fundus-edge doctor`` also imports each one."""
    return {fmt for fmt, names in BACKEND_PACKAGES.items() if any(package_installed(n) for n in names)}


def install_hint(fmt: str) -> str:
    """What to install for the backend of ``fmt`` artifacts."""
    return f"pip install 'fundus-edge[{EXTRA_FOR_FORMAT[fmt]}]' (adds {BACKEND_PACKAGES[fmt][0]})"


def create_backend(fmt: str, model_path: str | Path, settings: BackendSettings | None = None,
                   model_bytes: bytes | None = None) -> Backend:
    """The backend that runs a model file of format ``fmt`` ("onnx" or "tflite"). ``model_bytes``: the verified
    content of the file (the engine is built from them; the path is then only a name)."""
    if fmt == "onnx":
        from .onnxrt import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model_path, settings, model_bytes)
    if fmt == "tflite":
        from .litert import LiteRTBackend

        return LiteRTBackend(model_path, settings, model_bytes)
    raise UsageError(f"no runtime backend for model format {fmt!r}; this runtime knows {sorted(BACKENDS_BY_FORMAT)}")


def run_backend(fmt: str, model_path: str | Path, inputs: np.ndarray,
                settings: BackendSettings | None = None) -> tuple[np.ndarray, Backend]:
    """Outputs of a model file through its runtime backend, one image at a time as on the device."""
    with create_backend(fmt, model_path, settings) as backend:
        outs = [backend.infer(np.ascontiguousarray(inputs[i : i + 1])) for i in range(len(inputs))]
    return np.concatenate(outs), backend


__all__ = ["BACKENDS_BY_FORMAT", "BACKEND_PACKAGES", "EXTRA_FOR_FORMAT", "FORMATS_BY_BACKEND", "Backend",
           "BackendSettings", "create_backend", "install_hint", "installed_formats", "package_installed",
           "run_backend"]
