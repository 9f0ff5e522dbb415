"""Which model stage a build runs, chosen by the ``--model`` file's suffix, behind one small interface
(:class:`ModelStage`): a PyTorch model (checkpoint, TorchScript, ``.pt2``, ``reference:NAME``) is loaded and
exported with torch; a brought fp32 ``.onnx`` or ``.tflite`` file IS the reference (copied into the bundle byte
for byte) and never imports torch. Every later stage (preprocessing, quantization, gate, report, bundle) is the
same for all of them."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import MissingDependencyError
from .config import FORMATS, BuildConfig
from .formats import FormatSpec
from .progress import Progress
from .stages import Exported, ModelInfo, export_stage, load_model_stage

FILE_KINDS = {".onnx": "onnx", ".tflite": "tflite"}  # a brought model file: suffix -> its format (and reference)


class ModelStage(Protocol):
    """Load a model and write the reference format's fp32 file (with its parity check)."""

    kind: str  # "pytorch", "onnx", "tflite": recorded in the report and the manifest
    reference_format: str  # the format whose fp32 file locks the operating point

    def check(self, cfg: BuildConfig) -> None:
        """Fail before any work: what this stage needs installed, and options it cannot honour."""

    def load(self, cfg: BuildConfig, progress: Progress) -> ModelInfo: ...

    def export(self, fmt: FormatSpec, cfg: BuildConfig, model: ModelInfo, parity_x: np.ndarray, staging: Path,
               progress: Progress) -> Exported: ...


class TorchModelStage:
    """A PyTorch model: torch loads it, the exporters write each format, parity is checked against PyTorch."""

    kind = "pytorch"
    reference_format = "onnx"

    def check(self, cfg: BuildConfig) -> None:
        if importlib.util.find_spec("torch") is None:
            raise MissingDependencyError("torch", "export", "Building a bundle from a PyTorch model")

    def load(self, cfg: BuildConfig, progress: Progress) -> ModelInfo:
        return load_model_stage(cfg, progress)

    def export(self, fmt: FormatSpec, cfg: BuildConfig, model: ModelInfo, parity_x: np.ndarray, staging: Path,
               progress: Progress) -> Exported:
        return export_stage(fmt, cfg, model, parity_x, staging, progress)


def file_kind(model: str) -> str | None:
    """"onnx" / "tflite" for a brought model file (by suffix), None for anything torch loads."""
    return FILE_KINDS.get(Path(model).suffix.lower()) if not model.startswith("reference:") else None


def default_formats(model: str) -> tuple[str, ...]:
    """The formats a build makes when ``--formats`` is not given: a brought file's own, else onnx,tflite."""
    kind = file_kind(model)
    return (kind,) if kind else FORMATS


def model_stage(model: str) -> ModelStage:
    """The stage for ``--model``: by the file's suffix."""
    kind = file_kind(model)
    if kind == "onnx":
        from .intake_onnx import OnnxFileStage

        return OnnxFileStage()
    if kind == "tflite":
        from .intake_tflite import TfliteFileStage

        return TfliteFileStage()
    return TorchModelStage()
