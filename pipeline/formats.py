"""The format registry, toolchain side: format name -> exporter, quantizer, file suffix, input-layout default.

A new artifact format is one :class:`FormatSpec` entry here (plus its backend in ``runtime/backends``, which
stays the source of which backend runs a format). The first format of a build is the reference: its fp32 file
locks the operating point, and it must be :data:`REFERENCE_FORMAT`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..runtime.backends import BACKENDS_BY_FORMAT
from ..runtime.preprocess import PreprocessSpec
from . import format_onnx, format_tflite
from .artifacts import ExportedFile, QuantizedFile, QuantRequest
from .config import BuildConfig

REFERENCE_FORMAT = "onnx"


def _no_config_check(cfg: BuildConfig) -> None:
    return None


@dataclass(frozen=True)
class FormatSpec:
    name: str  # the manifest's artifact "format"; a key of runtime/backends BACKENDS_BY_FORMAT
    suffix: str  # file suffix: model.<precision><suffix>
    export: Callable[[Any, Path, PreprocessSpec, str, BuildConfig], ExportedFile]  # (module, path, spec, layout)
    export_title: Callable[[BuildConfig, str], str]  # the progress line of the export stage
    quantize: Callable[[QuantRequest], QuantizedFile]
    quantize_title: Callable[[BuildConfig, int], str]  # the progress line of the quantization stage
    layout: Callable[[BuildConfig, PreprocessSpec], str]  # the input layout of this format's files
    check_config: Callable[[BuildConfig], None] = _no_config_check  # fails fast, before any work

    def artifact_id(self, precision: str) -> str:
        return f"{self.name}-{precision}"

    def file_name(self, precision: str) -> str:
        return f"model.{precision}{self.suffix}"

    @property
    def backend(self) -> str:
        return BACKENDS_BY_FORMAT[self.name]


REGISTRY: dict[str, FormatSpec] = {
    "onnx": FormatSpec("onnx", ".onnx", format_onnx.export, format_onnx.export_title, format_onnx.quantize,
                       format_onnx.quantize_title, layout=lambda cfg, spec: spec.layout),
    "tflite": FormatSpec("tflite", ".tflite", format_tflite.export, format_tflite.export_title,
                         format_tflite.quantize, format_tflite.quantize_title,
                         layout=lambda cfg, spec: cfg.tflite_layout, check_config=format_tflite.check_config),
}


def build_formats(cfg: BuildConfig, reference: str = REFERENCE_FORMAT) -> list[FormatSpec]:
    """The formats a build makes, reference first; each one's own options checked. Raises :class:`UsageError`.
    ``reference``: the format whose fp32 file locks the operating point (a brought .tflite file's: tflite)."""
    names = cfg.formats
    others = [n for n in REGISTRY if n != reference]
    if (not names or names[0] != reference or len(set(names)) != len(names)
            or any(n not in REGISTRY for n in names)):
        raise UsageError(f"--formats is {reference} (its fp32 file is the reference), optionally followed by "
                         f"{' and '.join(others)}, comma-separated (e.g. {','.join([reference, *others])}); got "
                         f"{','.join(names) or 'nothing'}")
    specs = [REGISTRY[n] for n in names]
    for spec in specs:
        spec.check_config(cfg)
    return specs


def layout_default(fmt: str, cfg: BuildConfig, spec: PreprocessSpec) -> str:
    return REGISTRY[fmt].layout(cfg, spec)


__all__ = ["REFERENCE_FORMAT", "REGISTRY", "FormatSpec", "build_formats", "layout_default"]
