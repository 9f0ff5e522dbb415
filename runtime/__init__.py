"""The on-device runtime: numpy + pillow + one inference backend. It never imports torch or onnx."""

from __future__ import annotations

from ..bundle.read import Bundle, load_bundle
from .backends import BackendSettings
from .preprocess import PreprocessSpec, preprocess
from .screen import Screener, ScreeningResult, expand_inputs, load

__all__ = [
    "BackendSettings",
    "Bundle",
    "PreprocessSpec",
    "Screener",
    "ScreeningResult",
    "expand_inputs",
    "load",
    "load_bundle",
    "preprocess",
]
