"""The on-device runtime: numpy + pillow + one inference backend. It never imports torch or onnx.

The screening names are loaded on first use (PEP 562): the bundle reader imports ``runtime.preprocess``, and an
eager import of ``runtime.screen`` here (which imports the bundle reader) would make that a cycle.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Eager: these import nothing of bundle/ (and binding `preprocess` here keeps the function, not the submodule,
# behind `from fundus_edge.runtime import preprocess`).
from .backends import BackendSettings
from .preprocess import PreprocessSpec, preprocess

if TYPE_CHECKING:
    from ..bundle.read import Bundle, load_bundle
    from .screen import Screener, ScreeningResult, expand_inputs, load

_EXPORTS = {
    "Bundle": "..bundle.read",
    "load_bundle": "..bundle.read",
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
