"""The on-device runtime: numpy + pillow + one inference backend. It never imports torch or onnx.

The public names are loaded on first use (PEP 562), so importing one runtime module (``runtime.preprocess``, say,
which the bundle reader needs) does not import the whole runtime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..bundle.read import Bundle, load_bundle
    from .backends import BackendSettings
    from .preprocess import PreprocessSpec, preprocess
    from .screen import Screener, ScreeningResult, expand_inputs, load

_EXPORTS = {
    "BackendSettings": ".backends",
    "Bundle": "..bundle.read",
    "load_bundle": "..bundle.read",
    "PreprocessSpec": ".preprocess",
    "preprocess": ".preprocess",
    "Screener": ".screen",
    "ScreeningResult": ".screen",
    "expand_inputs": ".screen",
    "load": ".screen",
}

__all__ = ["BackendSettings", "Bundle", "PreprocessSpec", "Screener", "ScreeningResult", "expand_inputs", "load",
           "load_bundle", "preprocess"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
