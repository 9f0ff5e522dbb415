"""The gate stage, shared by ``build`` and ``check``: score each artifact file through its runtime backend,
evaluate the reference, gate every other artifact against it at the locked threshold, and summarise image
quality. Torch-free (numpy + the runtime backends), so ``check`` runs it with the device install.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingDependencyError
from ..runtime.backends import BackendSettings, run_backend
from ..runtime.postprocess import referable_probability
from ..runtime.preprocess import relayout
from .gate import FAIL, INSUFFICIENT, PASS, Evaluation, GateCriteria, GateResult, evaluate, gate
from .quality_gate import quality_summary

TIMING_IMAGES = 16  # artifacts scored elsewhere (the fallback search) are timed on this many images


@dataclass(frozen=True)
class GateArtifact:
    """One model file to score: where it is, which backend runs it, and the input layout it takes."""

    id: str
    format: str
    layout: str
    path: Path
    int8_mac_fraction: float | None = None  # int8 files: the share of MACs computed in int8 (gated too)


@dataclass(frozen=True)
class QualityInputs:
    """The image-quality verdicts of the gate images (only when the quality check ran)."""

    gradable: np.ndarray
    records: Sequence[Mapping[str, Any]]
    sources: Sequence[str]
    spec_source: str


@dataclass(frozen=True)
class GateData:
    """The labelled images the gate runs on, preprocessed once (in the model's layout)."""

    tensors: np.ndarray
    layout: str
    labels: np.ndarray
    positive: list[int]
    quality: QualityInputs | None = None


@dataclass
class Scored:
    """Validation scores per artifact id, mean inference time, and the artifacts this install cannot run."""

    scores: dict[str, np.ndarray] = field(default_factory=dict)
    infer_ms: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    first_missing: MissingDependencyError | None = None


@dataclass
class GateOutcome:
    """The gate's verdict: every artifact's evaluation, one gate per candidate, the quality summary."""

    reference: str
    threshold: float
    evaluations: dict[str, Evaluation]  # every scored artifact, in scoring order
    gates: list[GateResult]  # empty when there was no reference to gate against
    quality: dict[str, Any] | None

    @property
    def passed(self) -> bool:
        return all(self.gates)

    @property
    def verdict(self) -> str:
        """FAIL if any gate fails, else INSUFFICIENT EVIDENCE if any could not be shown, else PASS."""
        verdicts = {g.verdict for g in self.gates}
        return FAIL if FAIL in verdicts else (INSUFFICIENT if INSUFFICIENT in verdicts else PASS)

    @property
    def reference_eval(self) -> Evaluation:
        return self.evaluations[self.reference]


def score_artifact(art: GateArtifact, data: GateData, settings: BackendSettings | None,
                   n: int | None = None) -> tuple[np.ndarray, float]:
    """Referable probabilities of the first ``n`` gate images (all by default) through the artifact's backend,
    each file given the images in its own layout; and the mean inference time in ms."""
    x = data.tensors if n is None else data.tensors[:n]
    logits, backend = run_backend(art.format, art.path, relayout(x, data.layout, art.layout), settings)
    return referable_probability(logits, data.positive), float(np.mean(backend.timings.infer_ms))


def score_artifacts(artifacts: Sequence[GateArtifact], data: GateData, settings: BackendSettings | None,
                    known: Mapping[str, np.ndarray] | None = None, known_ms: Mapping[str, float] | None = None,
                    required: Collection[str] | None = None) -> Scored:
    """Score every artifact. Scores in ``known`` (already computed from the same files) are reused; those
    artifacts are only timed on :data:`TIMING_IMAGES` images unless ``known_ms`` has their time. An artifact
    whose runtime is not installed is skipped (reason in ``skipped``) unless its id is in ``required``
    (``None``: all are required), in which case the :class:`MissingDependencyError` propagates."""
    out = Scored(dict(known or {}), dict(known_ms or {}))
    for art in artifacts:
        try:
            if art.id not in out.scores:
                out.scores[art.id], out.infer_ms[art.id] = score_artifact(art, data, settings)
            elif art.id not in out.infer_ms:
                out.infer_ms[art.id] = score_artifact(art, data, settings, TIMING_IMAGES)[1]
        except MissingDependencyError as exc:
            if required is None or art.id in required:
                raise
            out.skipped[art.id] = str(exc)
            out.first_missing = out.first_missing or exc
    order = [a.id for a in artifacts if a.id in out.scores]
    out.scores = {k: out.scores[k] for k in order}
    return out


def gate_scores(scores: Mapping[str, np.ndarray], data: GateData, reference: str, threshold: float,
                criteria: GateCriteria, mac_fractions: Mapping[str, float | None] | None = None,
                relative: bool = True, certify: Mapping[str, np.ndarray] | None = None) -> GateOutcome:
    """Evaluate every scored artifact at ``threshold`` and gate each one against ``reference`` (``relative``
    False: absolute metrics only, no gate; ``reference`` then only names the quality summary's reference).
    ``certify``: artifact id -> the indices of the images that certify it (the others: all images)."""
    y = data.labels
    fractions = mac_fractions or {}
    evaluations: dict[str, Evaluation] = {}
    gates: list[GateResult] = []
    if relative:
        evaluations[reference] = evaluate(reference, y, scores[reference], threshold, criteria)
        gates = [_gate_one(k, scores, data, reference, threshold, criteria, evaluations[reference],
                           fractions.get(k), (certify or {}).get(k)) for k in scores if k != reference]
        evaluations.update({g.artifact: g.candidate_eval for g in gates
                            if (g.certification or {}).get("images") == "all"})
    for k, s in scores.items():  # what no gate evaluated (no reference)
        if k not in evaluations:
            evaluations[k] = evaluate(k, y, s, threshold, criteria)
    evaluations = {k: evaluations[k] for k in scores}
    quality = None
    if data.quality is not None:
        q = data.quality
        quality = quality_summary(y, q.gradable, scores, threshold, criteria, q.records, q.sources, q.spec_source,
                                  reference)
    return GateOutcome(reference, threshold, evaluations, gates, quality)


def _gate_one(k: str, scores: Mapping[str, np.ndarray], data: GateData, reference: str, threshold: float,
              criteria: GateCriteria, ref_eval: Evaluation, fraction: float | None,
              idx: np.ndarray | None) -> GateResult:
    """Gate artifact ``k`` on all images, or on the certification part ``idx`` (its reference re-evaluated there)."""
    y, r, c = data.labels, np.asarray(scores[reference]), np.asarray(scores[k])
    if idx is None:
        return gate(k, y, r, c, threshold, criteria, reference, ref_eval, fraction, {"images": "all", "n": len(y)})
    cert = {"images": "certification part", "n": len(idx), "indices": [int(i) for i in idx]}
    if len(idx) == 0 or y[idx].all() or not y[idx].any():
        g = gate(k, y, r, c, threshold, criteria, reference, ref_eval, fraction, cert)
        return replace(g, insufficient=(*g.insufficient, "the certification part lacks one class"))
    return gate(k, y[idx], r[idx], c[idx], threshold, criteria, reference, None, fraction, cert)


__all__ = ["GateArtifact", "GateData", "GateOutcome", "QualityInputs", "Scored", "gate_scores", "score_artifact",
           "score_artifacts"]
