"""The accuracy-aware fallback loop on TFLite: per-op float fallback in the LiteRT quantizer's recipe.

Ops are addressed by their *scope* (the names of their output tensors, what the quantizer matches recipe
regexes against), so one CONV_2D can stay float while every other CONV_2D is int8. Calibration runs once
(:func:`calibrate_tflite`); each trial only re-quantizes from the stored ranges. A model with ops kept in float
is no longer full-integer: the written file's coverage (integer vs float MACs, inner QUANTIZE/DEQUANTIZE pairs)
says so in the manifest, and an integer-only accelerator cannot run it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .quantize_tflite import (
    TfliteCalibration,
    TfliteQuantConfig,
    TfliteQuantResult,
    import_quantizer,
    quantize_calibrated,
)
from .search import FallbackBudget, FallbackResult, GateSpec, search_fallback

# ops worth keeping in float: they carry the MACs or the PTQ-fragile nonlinearities
RANKED_TFLITE_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "ADD", "MUL", "SUB",
                     "MEAN", "AVERAGE_POOL_2D", "HARD_SWISH", "LOGISTIC", "SOFTMAX", "GELU", "TANH",
                     "CONCATENATION", "RSQRT", "SQUARED_DIFFERENCE")


def tflite_ops(path: Path) -> list[tuple[str, str]]:
    """(scope, op name) of every operator of the main subgraph, in execution order."""
    tfl = import_quantizer().sub("utils.tfl_flatbuffer_utils")

    model = tfl.read_model(str(path))
    graph = model.subgraphs[0]
    codes = model.operatorCodes
    out = []
    for op in graph.operators:
        name = tfl.TFL_OP_CODE_TO_NAME.get(codes[op.opcodeIndex].builtinCode)
        out.append((tfl.get_op_scope(op, graph.tensors), str(name.value) if name is not None else "CUSTOM"))
    return out


def short_scope(scope: str) -> str:
    """A readable name for a long litert-torch scope: the module path of its first output tensor."""
    first = scope.split(";")[0]
    parts = [p.rsplit(".", 1)[-1] for p in first.split("/") if p]
    return "/".join(parts[-3:]) if parts else scope


@dataclass
class TfliteTarget:
    calibration: TfliteCalibration
    config: TfliteQuantConfig
    fmt: str = "tflite"

    @property
    def reference(self) -> Path:
        return self.calibration.fp32_path

    def candidates(self) -> list[tuple[str, str]]:
        return [(scope, op) for scope, op in tflite_ops(self.reference) if op in RANKED_TFLITE_OPS and scope]

    def describe(self, node: str) -> str:
        return short_scope(node)

    def nodes(self, excluded: list[str]) -> list[str]:
        return list(excluded)

    def quantize(self, excluded: list[str], path: Path) -> TfliteQuantResult:
        cfg = replace(self.config, float_scopes=tuple(self.config.float_scopes) + tuple(excluded))
        return quantize_calibrated(self.calibration, path, cfg)


def accuracy_aware_quantize_tflite(
    calibration: TfliteCalibration,
    out: Path,
    tuning_pool: np.ndarray,
    spec: GateSpec,
    config: TfliteQuantConfig | None = None,
    budget: FallbackBudget | None = None,
    artifact: str = "tflite-int8",
    log: Callable[[str], None] = lambda s: None,
) -> FallbackResult:
    """``tuning_pool`` and ``spec.val_inputs`` are in the .tflite file's own layout."""
    target = TfliteTarget(calibration, config or TfliteQuantConfig())
    return search_fallback(target, out, tuning_pool, spec, budget, artifact, log)
