"""The build's gate stage: the shared gate (:mod:`..gate.stage`) run on the files in the staging directory,
reusing the scores the reference lock and the fallback searches already computed from the same files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..gate.stage import GateArtifact, GateData, GateOutcome, gate_scores, score_artifacts
from ..runtime.backends import BackendSettings
from .artifacts import BuiltArtifact
from .progress import Progress
from .stages import Quantized, Reference


@dataclass
class BuildGate:
    """The gate's verdict on the built files, with each file's size and mean inference time."""

    outcome: GateOutcome
    scores: dict[str, list[float]]
    infer_ms: dict[str, float]
    sizes: dict[str, int]

    @property
    def passed(self) -> bool:
        return self.outcome.passed


def _log_outcome(o: GateOutcome, n: int, progress: Progress) -> None:
    for g in o.gates:
        progress.say(f"{g.artifact}: AUC {g.candidate_eval.auc:.4f} (Δ {g.delta_auc:+.4f}), sensitivity "
                     f"{g.candidate_eval.sensitivity:.4f} (Δ {g.delta_sensitivity:+.4f}), flips {g.flips} -> "
                     f"{g.verdict}" + (": " + "; ".join(g.failures or g.insufficient) if not g else "")
                     + f" [{g.certification['images'] if g.certification else 'all'}, n {g.candidate_eval.n}]")
    q = o.quality
    if q is not None:
        progress.say(f"image quality: {q['n_ungradable']}/{n} validation images ungradable "
                     f"({q['ungradable_rate']:.1%}); gradable-only sensitivity "
                     + ", ".join(f"{k} {v['sensitivity']:.4f}" for k, v in q["gradable"].items()
                                 if v.get("sensitivity") is not None))
    r = o.reference_eval
    progress.say(f"reference {o.reference}: AUC {r.auc:.4f} ({r.auc_ci[0]:.3f}-{r.auc_ci[1]:.3f}), threshold "
                 f"{o.threshold:.4f}, sensitivity {r.sensitivity:.4f}, specificity {r.specificity:.4f} "
                 f"({progress.seconds()})")


def build_gate_stage(artifacts: Sequence[BuiltArtifact], staging: Path, data: GateData, ref: Reference,
                     quantized: Sequence[Quantized], settings: BackendSettings, progress: Progress) -> BuildGate:
    """Score every shipped file through its runtime backend and gate each one against the reference."""
    progress.stage("clinical gate: evaluating the shipped files through the runtime backends")
    known = {ref.artifact.id: ref.scores}
    known.update({q.artifact.id: q.fallback.scores for q in quantized if q.fallback is not None})
    files = [GateArtifact(a.id, a.format, a.layout, staging / a.path) for a in artifacts]
    scored = score_artifacts(files, data, settings, known, {ref.artifact.id: ref.infer_ms})
    fractions = {q.artifact.id: q.int8_mac_fraction for q in quantized}
    # a file a fallback search selected is certified on the images the search never saw; plain int8 on all
    certify = {q.artifact.id: ref.certify for q in quantized if q.fallback is not None and q.fallback.excluded}
    outcome = gate_scores(scored.scores, data, ref.artifact.id, ref.threshold, ref.gating.criteria, fractions,
                          certify=certify)
    _log_outcome(outcome, len(data.labels), progress)
    return BuildGate(outcome, {k: [float(v) for v in s] for k, s in scored.scores.items()}, scored.infer_ms,
                     {a.id: (staging / a.path).stat().st_size for a in artifacts})
