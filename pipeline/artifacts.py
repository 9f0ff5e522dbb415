"""Typed values that flow between the build stages: built files, what exporters and quantizers return."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..quantization.fallback import FallbackResult, GateSpec
from .config import BuildConfig
from .progress import Progress


@dataclass(frozen=True)
class BuiltArtifact:
    """One model file in the staging directory, as the manifest lists it."""

    id: str  # "<format>-<precision>"
    path: str  # file name inside the bundle
    format: str
    precision: str
    layout: str  # the file's input layout
    io_dtype: str

    def entry(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "format": self.format, "precision": self.precision,
                "layout": self.layout, "io_dtype": self.io_dtype}


@dataclass(frozen=True)
class ExportedFile:
    """What a format's exporter wrote: its export facts and, for the reference format, the MAC count."""

    info: dict[str, Any]
    compute: dict[str, Any] | None = None


@dataclass(frozen=True)
class QuantRequest:
    """Everything a format's quantizer needs; tensors are already in the file's own layout."""

    cfg: BuildConfig
    fp32: Path
    out: Path
    staging: Path
    calibration: np.ndarray
    gating: GateSpec  # how the accuracy-aware fallback gates its candidates (val_inputs in the file's layout)
    progress: Progress
    input_name: str = "input"  # the fp32 file's input name (export/contract.py INPUT_NAME, or a brought file's)


@dataclass
class QuantizedFile:
    """What a format's quantizer wrote."""

    result: Any  # OnnxQuantResult | TfliteQuantResult: .to_dict(), .int8_mac_fraction
    io_dtype: str
    summary_line: str  # the detail line after the stage, e.g. "int8 MAC share 98.1%, quantized ops 60"
    fallback: FallbackResult | None = None  # when the accuracy-aware fallback ran (its scores are reusable)
    layer_errors: list[dict[str, Any]] = field(default_factory=list)  # per-layer fp32-vs-int8 error table
