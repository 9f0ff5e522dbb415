"""Accuracy-aware int8: quantize fully; if the clinical gate fails, keep the most sensitive layers in float.

The loop plays the role of Intel Neural Compressor's "basic" strategy or NNCF's accuracy control, on
onnxruntime's own quantizer, and it never hides what it did:

1. quantize every supported node (calibration ranges are cached, so later trials skip calibration);
2. gate the int8 file (through the runtime backend) against fp32 on the validation set;
3. if it fails, rank candidate nodes by sensitivity: quantize with one node kept in float and measure how far
   the decision margins (logit space, not saturated probabilities) move from fp32 on a *tuning subset* of
   calibration images (no labels, so the ranking does not peek at the validation set), weighting images by how
   close their fp32 margin lies to the operating point (:func:`decision_weights`);
4. keep the 1, 2, 4, 8, ... most sensitive nodes in float, re-gating each, until the gate holds; then bisect
   down to the shortest passing prefix (a few trials instead of one per node); if no prefix passes, take
   greedy steps from the best candidate (a node joins only if the gate gets closer), all within the trial /
   time budget.

Every step is recorded with what was excluded, the gate numbers and the int8 MAC share. A candidate whose
MACs are mostly fp32 fails the gate (``GateCriteria.min_int8_mac_fraction``, default 50 %): that is an fp32
model with extra steps, and the bundle's fp32 file is the honest choice. Lower the floor to accept one; it is
then flagged in the report and manifest. If nothing is accepted, the best
candidate's numbers are returned for the caller to report (the build then exits non-zero).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from .quantize_onnx import OnnxQuantConfig, OnnxQuantResult, quantize_onnx
from .search import (
    MOSTLY_FLOAT,
    FallbackBudget,
    FallbackResult,
    FallbackStep,
    GateSpec,
    decision_weights,
    search_fallback,
)

_RANKED_OPS = ("Conv", "MatMul", "Gemm", "Add", "Mul", "Softmax", "LayerNormalization", "Gelu", "HardSwish",
               "HardSigmoid", "Sigmoid", "GlobalAveragePool", "ReduceMean", "AveragePool", "Concat")


def module_path(node: Any) -> str:
    """The PyTorch module a node came from, from the dynamo exporter's metadata ("features.9.block.2.fc1");
    "" when the file carries none (other exporters)."""
    import ast

    meta = {p.key: p.value for p in node.metadata_props}
    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
    except (ValueError, SyntaxError):
        return ""
    modules = [str(s) for s in scopes[:-1] if s]  # the last entry names the op itself
    return modules[-1] if modules else ""


@dataclass(frozen=True)
class _TensorUnit:
    tensor: str
    ops: str  # "producer->consumers" op types
    where: str  # the producer's PyTorch module path
    nodes: list[str]  # the graph nodes excluded to keep the tensor float


@dataclass
class OnnxTarget:
    fp32: Path
    preprocessed: Path
    calibration: np.ndarray
    input_name: str
    config: OnnxQuantConfig
    cache: Path
    fmt: str = "onnx"

    @property
    def reference(self) -> Path:
        return self.fp32

    @cached_property
    def _tensors(self) -> list[_TensorUnit]:
        """One candidate per activation tensor: keeping it float means excluding its producer *and* every
        consumer. Excluding one node is not enough in QDQ: a tensor between a quantized producer and a
        quantized consumer stays quantized whichever single node is excluded (measured: on the ViT reference,
        32 single nodes in float still left 7 flips; the residual stream into LayerNorm never went float)."""
        import onnx

        graph = onnx.load(str(self.preprocessed)).graph
        producer = {o: n for n in graph.node for o in n.output if n.name}
        consumers: dict[str, list[Any]] = {}
        for n in graph.node:
            for i in n.input:
                if n.name and i:
                    consumers.setdefault(i, []).append(n)
        initializers = {i.name for i in graph.initializer}
        units = []
        for tensor, users in consumers.items():
            if tensor in initializers:
                continue
            prod = producer.get(tensor)
            nodes = ([prod] if prod is not None else []) + users
            if not any(n.op_type in _RANKED_OPS for n in nodes):
                continue
            ops = f"{prod.op_type if prod is not None else 'input'}->{'/'.join(sorted({u.op_type for u in users}))}"
            units.append(_TensorUnit(tensor, ops, module_path(prod) if prod is not None else "input",
                                     sorted({n.name for n in nodes})))
        return units

    def candidates(self) -> list[tuple[str, str]]:
        return [(u.tensor, u.ops) for u in self._tensors]

    def describe(self, node: str) -> str:
        return next((u.where for u in self._tensors if u.tensor == node), "")

    def nodes(self, excluded: list[str]) -> list[str]:
        units = {u.tensor: u.nodes for u in self._tensors}
        return sorted({n for t in excluded for n in units.get(t, [t])})

    def quantize(self, excluded: list[str], path: Path) -> OnnxQuantResult:
        cfg = replace(self.config, nodes_to_exclude=tuple(self.config.nodes_to_exclude) + tuple(self.nodes(excluded)))
        return quantize_onnx(self.fp32, path, self.calibration, self.input_name, cfg, cache_path=self.cache,
                             preprocessed=self.preprocessed)


def accuracy_aware_quantize(
    fp32: Path,
    preprocessed: Path,
    out: Path,
    calibration: np.ndarray,
    spec: GateSpec,
    input_name: str,
    config: OnnxQuantConfig | None = None,
    budget: FallbackBudget | None = None,
    artifact: str = "onnx-int8",
    log: Callable[[str], None] = lambda s: None,
) -> FallbackResult:
    """The loop on onnxruntime's QDQ quantizer (``nodes_to_exclude``), calibrating once (cached ranges)."""
    with tempfile.TemporaryDirectory(prefix="fe-onnx-cal-") as tmp:
        target = OnnxTarget(fp32, preprocessed, calibration, input_name, config or OnnxQuantConfig(),
                            Path(tmp) / "calibration.json")
        return search_fallback(target, out, calibration, spec, budget, artifact, log)


__all__ = ["MOSTLY_FLOAT", "FallbackBudget", "FallbackResult", "FallbackStep", "GateSpec", "OnnxTarget",
           "accuracy_aware_quantize", "decision_weights", "module_path", "search_fallback"]
