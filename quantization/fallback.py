"""Accuracy-aware int8: quantize fully; if the clinical gate fails, keep the most sensitive layers in float.

The loop plays the role of Intel Neural Compressor's "basic" strategy or NNCF's accuracy control, on
onnxruntime's own quantizer, and it never hides what it did:

1. quantize every supported node (calibration ranges are cached, so later trials skip calibration);
2. gate the int8 file (through the runtime backend) against fp32 on the validation set;
3. if it fails, rank candidate nodes by sensitivity: quantize with one node kept in float and measure how far
   the decision margins (logit space, not saturated probabilities) move from fp32 on a *tuning subset* of
   calibration images (no labels, so the ranking does not peek at the validation set);
4. exclude nodes greedily in that order, re-gating after each, until the gate holds or the trial / time
   budget is spent.

Every step is recorded with what was excluded, the gate numbers and the int8 MAC share. A result whose MACs
are mostly fp32 is flagged. If nothing passes, the best candidate's numbers are returned for the caller to
report (the build then exits non-zero).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.backends import BackendSettings, run_backend
from ..runtime.postprocess import referable_margin, referable_probability
from .gate import GateCriteria, GateResult, gate
from .quantize_onnx import OnnxQuantConfig, OnnxQuantResult, quantize_onnx

MOSTLY_FLOAT = 0.5  # int8 MAC share below this is flagged: "int8" in name only
_RANKED_OPS = ("Conv", "MatMul", "Gemm", "Add", "Mul", "Softmax", "LayerNormalization", "Gelu", "HardSwish",
               "HardSigmoid", "Sigmoid", "GlobalAveragePool", "ReduceMean", "AveragePool", "Concat")


@dataclass(frozen=True)
class FallbackBudget:
    max_trials: int = 12  # gated candidates after the first full quantization
    max_seconds: float = 900.0
    max_ranked_nodes: int = 80  # sensitivity is measured for at most this many candidate nodes
    tuning_images: int = 32


@dataclass
class FallbackStep:
    step: int
    excluded: list[str]
    passed: bool
    delta_auc: float
    delta_sensitivity: float
    flips: int
    int8_mac_fraction: float
    failures: list[str]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FallbackResult:
    passed: bool
    quant: OnnxQuantResult
    gate: GateResult
    scores: np.ndarray
    steps: list[FallbackStep] = field(default_factory=list)
    ranking: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)

    @property
    def mostly_float(self) -> bool:
        return self.quant.int8_mac_fraction < MOSTLY_FLOAT

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "excluded_nodes": self.excluded,
            "kept_in_float": {n: r["op_type"] for r in self.ranking for n in [r["node"]] if n in self.excluded},
            "int8_mac_fraction": self.quant.int8_mac_fraction,
            "mostly_float": self.mostly_float,
            "steps": [s.to_dict() for s in self.steps],
            "ranking": self.ranking,
        }


def _candidate_nodes(model_path: Path) -> list[tuple[str, str]]:
    import onnx

    graph = onnx.load(str(model_path)).graph
    return [(n.name, n.op_type) for n in graph.node if n.op_type in _RANKED_OPS and n.name]


def accuracy_aware_quantize(
    fp32: Path,
    preprocessed: Path,
    out: Path,
    calibration: np.ndarray,
    val_inputs: np.ndarray,
    labels: np.ndarray,
    positive: list[int],
    reference_scores: np.ndarray,
    threshold: float,
    criteria: GateCriteria,
    input_name: str,
    config: OnnxQuantConfig | None = None,
    budget: FallbackBudget | None = None,
    settings: BackendSettings | None = None,
    artifact: str = "onnx-int8",
    log: Callable[[str], None] = lambda s: None,
) -> FallbackResult:
    cfg = config or OnnxQuantConfig()
    bud = budget or FallbackBudget()
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="fe-fallback-"))
    cache = tmp / "calibration.json"
    try:
        def trial(excluded: list[str], path: Path) -> tuple[OnnxQuantResult, np.ndarray, GateResult]:
            q = quantize_onnx(fp32, path, calibration, input_name, replace(cfg, nodes_to_exclude=tuple(excluded)),
                              cache_path=cache, preprocessed=preprocessed)
            logits, _ = run_backend("onnx", path, val_inputs, settings)
            scores = referable_probability(logits, positive)
            return q, scores, gate(artifact, labels, reference_scores, scores, threshold, criteria)

        def record(step: int, excluded: list[str], q: OnnxQuantResult, g: GateResult, t0: float) -> FallbackStep:
            s = FallbackStep(step, list(excluded), g.passed, g.delta_auc, g.delta_sensitivity, g.flips,
                             q.int8_mac_fraction, list(g.failures), time.perf_counter() - t0)
            log(f"      step {step}: {len(excluded)} node(s) in float, int8 MACs {q.int8_mac_fraction:.1%}, "
                f"ΔAUC {g.delta_auc:+.4f}, Δsens {g.delta_sensitivity:+.4f}, flips {g.flips} -> "
                f"{'PASS' if g else 'fail'}")
            return s

        t0 = time.perf_counter()
        q, scores, g = trial([], out)
        steps = [record(0, [], q, g, t0)]
        if g:
            return FallbackResult(True, q, g, scores, steps)

        log(f"      plain int8 fails the gate ({'; '.join(g.failures)}): ranking node sensitivity on "
            f"{min(bud.tuning_images, len(calibration))} tuning images")
        tuning = calibration[: bud.tuning_images]
        fp_logits, _ = run_backend("onnx", fp32, tuning, settings)
        fp_margin = referable_margin(fp_logits, positive)
        full_logits, _ = run_backend("onnx", out, tuning, settings)
        base_err = float(np.mean(np.abs(referable_margin(full_logits, positive) - fp_margin)))
        ranking: list[dict[str, Any]] = []
        probe = tmp / "probe.onnx"
        for name, op in _candidate_nodes(preprocessed)[: bud.max_ranked_nodes]:
            if time.perf_counter() - t_start > bud.max_seconds / 2:
                log("      sensitivity ranking stopped at half the time budget")
                break
            quantize_onnx(fp32, probe, calibration, input_name, replace(cfg, nodes_to_exclude=(name,)),
                          cache_path=cache, preprocessed=preprocessed)
            logits, _ = run_backend("onnx", probe, tuning, settings)
            err = float(np.mean(np.abs(referable_margin(logits, positive) - fp_margin)))
            ranking.append({"node": name, "op_type": op, "margin_error_when_float": err,
                            "gain": base_err - err})
        ranking.sort(key=lambda r: -r["gain"])
        order = [r["node"] for r in ranking if r["gain"] > 0]
        log(f"      {len(order)} of {len(ranking)} nodes reduce the margin error when kept in float; "
            f"base error {base_err:.4f}")

        best: tuple[OnnxQuantResult, np.ndarray, GateResult, list[str]] = (q, scores, g, [])
        excluded: list[str] = []
        candidate = tmp / "candidate.onnx"
        for step, node in enumerate(order[: bud.max_trials], start=1):
            if time.perf_counter() - t_start > bud.max_seconds:
                log("      time budget spent")
                break
            excluded.append(node)
            t0 = time.perf_counter()
            q, scores, g = trial(excluded, candidate)
            steps.append(record(step, excluded, q, g, t0))
            if _better(g, best[2]):
                best = (q, scores, g, list(excluded))
                shutil.copyfile(candidate, tmp / "best.onnx")
            if g:
                break
        q, scores, g, kept = best
        if kept:
            shutil.copyfile(tmp / "best.onnx", out)
            q.path = out
        return FallbackResult(bool(g), q, g, scores, steps, ranking, kept)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _better(a: GateResult, b: GateResult) -> bool:
    """Passing beats failing; then fewer failures; then fewer flips; then smaller AUC loss."""
    return (a.passed, -len(a.failures), -a.flips, a.delta_auc) > (b.passed, -len(b.failures), -b.flips, b.delta_auc)
