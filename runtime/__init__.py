"""The on-device runtime: numpy + pillow + one inference backend. It never imports torch or onnx.

The names below are imported on first use (PEP 562): ``bundle/`` imports ``runtime.preprocess`` and
``runtime.quality`` while ``runtime.screen`` imports ``bundle/``, so an eager import here would make
``import fundus_edge.bundle.read`` (or ``pipeline.build``) circular when it comes first."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..bundle.read import Bundle, load_bundle
    from .backends import BackendSettings
    from .preprocess import PreprocessSpec, preprocess
    from .screen import Screener, ScreeningResult, expand_inputs, load

_WHERE = {"Bundle": "..bundle.read", "load_bundle": "..bundle.read", "BackendSettings": ".backends",
          "PreprocessSpec": ".preprocess", "preprocess": ".preprocess", "Screener": ".screen",
          "ScreeningResult": ".screen", "expand_inputs": ".screen", "load": ".screen"}

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


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)
