"""The accuracy-aware fallback search, for any toolchain behind :class:`FallbackTarget` (ONNX: :mod:`.fallback`;
TFLite: :mod:`.fallback_tflite`). See :mod:`.fallback` for the method; this module holds the loop and its types."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..gate.gate import GateCriteria, GateResult, gate
from ..runtime.backends import BackendSettings, run_backend
from ..runtime.postprocess import referable_margin, referable_probability

MOSTLY_FLOAT = 0.5  # int8 MAC share below this is flagged: "int8" in name only


@dataclass(frozen=True)
class FallbackBudget:
    max_trials: int = 24  # gated candidates after the first full quantization
    max_seconds: float = 900.0
    max_ranked_nodes: int = 160  # sensitivity is measured for at most this many candidate nodes
    tuning_images: int = 64


@dataclass(frozen=True)
class GateSpec:
    """How each candidate is gated: like the build's final gate, on the validation set (inputs in the layout of
    the files being quantized) against the fp32 reference scores at the locked threshold.

    Plain int8 (the one pre-specified candidate) is gated on every image; the candidates of the fallback search
    only on ``search`` (indices; ``None``: all), so that the disjoint rest can certify the one it picks without
    selection bias. Candidates are selected on point estimates (no harm observed: ``GateResult.acceptable``)."""

    val_inputs: np.ndarray
    labels: np.ndarray
    positive: list[int]
    reference_scores: np.ndarray
    threshold: float
    criteria: GateCriteria
    settings: BackendSettings | None = None
    search: np.ndarray | None = None


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
    n_images: int = 0  # the images it was gated on: all for plain int8, the search part for a candidate

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FallbackResult:
    passed: bool
    quant: QuantOutcome
    gate: GateResult
    scores: np.ndarray
    steps: list[FallbackStep] = field(default_factory=list)
    ranking: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    float_nodes: list[str] = field(default_factory=list)  # the ops actually left in float (graph names)

    @property
    def mostly_float(self) -> bool:
        return self.quant.int8_mac_fraction < MOSTLY_FLOAT

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "excluded_nodes": self.excluded,
            "float_nodes": self.float_nodes,
            "kept_in_float": {n: r["op_type"] for r in self.ranking for n in [r["node"]] if n in self.excluded},
            # in exclusion order, with where each node sits in the source model (module path)
            "kept_in_float_detail": [{"node": r["node"], "op_type": r["op_type"], "where": r.get("where", "")}
                                     for n in self.excluded for r in self.ranking if r["node"] == n],
            "int8_mac_fraction": self.quant.int8_mac_fraction,
            "mostly_float": self.mostly_float,
            "steps": [s.to_dict() for s in self.steps],
            "ranking": self.ranking,
        }


def decision_weights(margins: np.ndarray, threshold: float, scale: float = 1.0) -> np.ndarray:
    """Weights (summing to 1) that favour images near the operating point: a Cauchy bump of width ``scale``
    logits around the threshold's margin. Quantization error on an image far from the threshold (margin 15,
    say) cannot flip its decision, yet it dominates a plain mean: measured on the MobileNetV3 reference, the
    int8 margin error had mean 0.32 and standard deviation 1.38 logits, the tail all on saturated images."""
    t = float(np.log(threshold / (1.0 - threshold))) if 0.0 < threshold < 1.0 else 0.0
    w = 1.0 / (1.0 + ((np.asarray(margins, dtype=np.float64) - t) / scale) ** 2)
    return w / w.sum()


class FallbackTarget(Protocol):
    """One toolchain's side of the loop: what can be kept in float, and how to quantize with exclusions.

    ``quantize`` must reuse one calibration across calls (the loop quantizes dozens of times)."""

    @property
    def fmt(self) -> str: ...  # runtime backend format of the files it writes ("onnx" | "tflite")

    @property
    def reference(self) -> Path: ...  # the fp32 file of the same format, for the sensitivity ranking

    def candidates(self) -> list[tuple[str, str]]: ...  # (node id, op type) in graph order

    def describe(self, node: str) -> str: ...  # where the node sits in the source model, for people

    def nodes(self, excluded: list[str]) -> list[str]: ...  # the graph's own op names these candidates keep float

    def quantize(self, excluded: list[str], path: Path) -> QuantOutcome: ...


class QuantOutcome(Protocol):
    path: Path

    @property
    def int8_mac_fraction(self) -> float: ...


def search_fallback(
    target: FallbackTarget,
    out: Path,
    tuning_pool: np.ndarray,
    spec: GateSpec,
    budget: FallbackBudget | None = None,
    artifact: str = "int8",
    log: Callable[[str], None] = lambda s: None,
) -> FallbackResult:
    """Quantize fully, gate, and on failure keep the most sensitive nodes in float until the gate holds.

    ``tuning_pool`` (calibration images, in the target file's layout) ranks the candidates; ``spec`` gates them."""
    tmp = Path(tempfile.mkdtemp(prefix="fe-fallback-"))
    try:
        search = _Search(target, out, spec, budget or FallbackBudget(), artifact, log, tmp)
        first = search.first()
        if first.passed:
            return first
        search.rank(tuning_pool)
        search.run()
        return search.result()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _Search:
    """The state of one fallback search: every trial is gated and recorded; the best candidate is kept."""

    def __init__(self, target: FallbackTarget, out: Path, spec: GateSpec, budget: FallbackBudget, artifact: str,
                 log: Callable[[str], None], tmp: Path) -> None:
        self.target, self.out, self.spec, self.bud, self.artifact, self.log, self.tmp = (
            target, out, spec, budget, artifact, log, tmp)
        self.t_start = time.perf_counter()
        self.steps: list[FallbackStep] = []
        self.ranking: list[dict[str, Any]] = []
        self.order: list[str] = []
        self.candidate = tmp / f"candidate{out.suffix}"

    def trial(self, excluded: list[str], path: Path) -> tuple[QuantOutcome, np.ndarray, GateResult]:
        """Quantize, score every validation image, gate: plain int8 on all images, a candidate on the search part."""
        q = self.target.quantize(excluded, path)
        logits, _ = run_backend(self.target.fmt, path, self.spec.val_inputs, self.spec.settings)
        scores = referable_probability(logits, self.spec.positive)
        sp = self.spec
        idx = np.arange(len(sp.labels)) if sp.search is None or not excluded else np.asarray(sp.search)
        return q, scores, gate(self.artifact, sp.labels[idx], sp.reference_scores[idx], scores[idx], sp.threshold,
                               sp.criteria, int8_mac_fraction=q.int8_mac_fraction,
                               certification={"images": "all" if len(idx) == len(sp.labels) else "search part",
                                              "n": len(idx)})

    def record(self, excluded: list[str], q: QuantOutcome, g: GateResult, t0: float) -> None:
        step = len(self.steps)
        self.steps.append(FallbackStep(step, list(excluded), g.acceptable, g.delta_auc, g.delta_sensitivity, g.flips,
                                       q.int8_mac_fraction, list(g.failures), time.perf_counter() - t0,
                                       g.candidate_eval.n))
        self.log(f"      step {step}: {len(excluded)} kept in float, int8 MACs {q.int8_mac_fraction:.1%}, "
                 f"ΔAUC {g.delta_auc:+.4f}, Δsens {g.delta_sensitivity:+.4f}, flips {g.flips} -> "
                 f"{'no harm observed' if g.acceptable else 'fail'}")

    def first(self) -> FallbackResult:
        """Plain int8 (nothing in float): the result when it passes, and the first 'best'."""
        t0 = time.perf_counter()
        q, scores, g = self.trial([], self.out)
        self.record([], q, g, t0)
        self.best: tuple[QuantOutcome, np.ndarray, GateResult, list[str]] = (q, scores, g, [])
        return FallbackResult(g.acceptable, q, g, scores, self.steps)

    def rank(self, tuning_pool: np.ndarray) -> None:
        """Order the candidates by how much keeping each alone in float reduces the decision-weighted margin error
        on the tuning images (ranking stops at half the time budget)."""
        sp, fmt = self.spec, self.target.fmt
        tuning = tuning_pool[: self.bud.tuning_images]
        self.log(f"      plain int8 fails the gate ({'; '.join(self.best[2].failures)}): ranking node sensitivity "
                 f"on {len(tuning)} tuning images")
        fp_logits, _ = run_backend(fmt, self.target.reference, tuning, sp.settings)
        fp_margin = referable_margin(fp_logits, sp.positive)
        weights = decision_weights(fp_margin, sp.threshold)

        def margin_error(logits: np.ndarray) -> float:
            return float(np.sum(weights * np.abs(referable_margin(logits, sp.positive) - fp_margin)))

        full_logits, _ = run_backend(fmt, self.out, tuning, sp.settings)
        base_err = margin_error(full_logits)
        probe = self.tmp / f"probe{self.out.suffix}"
        candidates = self.target.candidates()
        for name, op in candidates[: self.bud.max_ranked_nodes]:
            if time.perf_counter() - self.t_start > self.bud.max_seconds / 2:
                self.log("      sensitivity ranking stopped at half the time budget")
                break
            self.target.quantize([name], probe)
            logits, _ = run_backend(fmt, probe, tuning, sp.settings)
            err = margin_error(logits)
            self.ranking.append({"node": name, "op_type": op, "where": self.target.describe(name),
                                 "margin_error_when_float": err, "gain": base_err - err})
        self.ranking.sort(key=lambda r: -r["gain"])
        self.order = [r["node"] for r in self.ranking]
        self.log(f"      {sum(r['gain'] > 0 for r in self.ranking)} of {len(self.ranking)} ranked candidates "
                 f"({len(candidates)} candidates) reduce the margin error when kept in float; base error "
                 f"{base_err:.4f}")

    @staticmethod
    def key(g: GateResult, excluded: list[str]) -> tuple[Any, ...]:
        """Passing beats failing; among passing, fewer nodes in float; otherwise the closest to passing."""
        return (g.acceptable, -len(excluded) if g.acceptable else 0, *_rank(g))

    def try_set(self, excluded: list[str]) -> bool:
        """Gate one candidate; remember it if it is the best so far. True when it passed."""
        t0 = time.perf_counter()
        q, scores, g = self.trial(excluded, self.candidate)
        self.record(excluded, q, g, t0)
        if self.key(g, excluded) > self.key(self.best[2], self.best[3]):
            self.best = (q, scores, g, list(excluded))
            shutil.copyfile(self.candidate, self.tmp / f"best{self.out.suffix}")
        return g.acceptable

    def out_of_budget(self) -> bool:
        if len(self.steps) - 1 >= self.bud.max_trials:
            self.log("      trial budget spent")
            return True
        if time.perf_counter() - self.t_start > self.bud.max_seconds:
            self.log("      time budget spent")
            return True
        return False

    def run(self) -> None:
        """Coarse: keep 1, 2, 4, 8, ... of the most sensitive nodes in float until the gate holds; then bisect
        down to the shortest passing prefix; if no prefix passed, greedy steps from the best candidate."""
        order, k, passed_at = self.order, 1, 0
        while k <= len(order) and not self.out_of_budget():
            if self.try_set(order[:k]):
                passed_at = k
                break
            if self.steps[-1].int8_mac_fraction < self.spec.criteria.min_int8_mac_fraction:
                self.log("      more fallback would leave the model mostly fp32; stopping")
                break
            k = len(order) if k < len(order) < 2 * k else 2 * k
        lo, hi = passed_at // 2, passed_at  # lo is known (or assumed, for 0) to fail
        while passed_at and hi - lo > 1 and not self.out_of_budget():
            mid = (lo + hi) // 2
            if self.try_set(order[:mid]):
                hi = mid
            else:
                lo = mid
        for node in order if not self.best[2].acceptable else []:
            if self.best[2].acceptable or self.out_of_budget():
                break
            if node not in self.best[3]:
                self.try_set([*self.best[3], node])

    def result(self) -> FallbackResult:
        q, scores, g, kept = self.best
        if kept:
            shutil.copyfile(self.tmp / f"best{self.out.suffix}", self.out)
            q.path = self.out
        return FallbackResult(g.acceptable, q, g, scores, self.steps, self.ranking, kept, self.target.nodes(kept))


def _rank(g: GateResult) -> tuple[int, int, float]:
    """Among candidates: fewer gate failures, then fewer flips, then smaller AUC loss."""
    return (-len(g.failures), -g.flips, g.delta_auc)
