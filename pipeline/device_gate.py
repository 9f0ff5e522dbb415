"""The clinical gate on the target's kernels: ``check --device rpi4`` (and ``build --device``).

The int8 files are run by the device's own runtime stack, an arm64 Python with the real aarch64 wheels under QEMU
user mode (``devices/emulate.py``'s worker, profile CPU model), on the gate images or a stated subset, and THOSE
outputs go through the same gate (:func:`..gate.stage.gate_scores`) against the fp32 reference. The reference
scores are the host's (x86_64): fp32 is not what differs between kernels, and emulating it would double the
cost. Each image's preprocessed tensor is hashed on both sides, so the report says whether the device saw the
same input; the host-vs-emulated output difference of each int8 file is reported (max |Δlogit| in output LSBs,
max |Δp|, decisions that differ).

Emulation is slow (QEMU translates every Arm instruction): the report gives the emulator's seconds per image,
never as device latency.
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle.read import Bundle
from ..devices.caps import native_prefix, run_worker
from ..devices.emulate import want_emulation
from ..devices.parity import output_lsb
from ..devices.profile import BACKEND_FOR_FORMAT, get_profile
from ..errors import EmulationError, UsageError
from ..gate.gate import FAIL, INSUFFICIENT, PASS, GateCriteria, GateResult
from ..gate.stage import GateData, GateOutcome, gate_scores
from ..runtime.backends import BackendSettings, run_backend
from ..runtime.postprocess import referable_probability
from ..runtime.preprocess import relayout

Log = Callable[[str], None]


@dataclass(frozen=True)
class DeviceGateConfig:
    """Which device profile, on how many of the gate images (``None``: all; else a seeded stratified sample)."""

    device: str
    images: int | None = None
    seed: int = 0
    cache: Path | None = None  # the emulation root's cache dir (default: the user cache dir)
    timeout: float | None = None


@dataclass(frozen=True)
class OutputDifference:
    """Host (x86_64) vs device outputs of one int8 file on the same images."""

    artifact: str
    n: int
    max_abs_logit: float
    lsb: float | None
    max_lsb: float | None
    max_abs_probability: float
    decisions_differ: int
    inputs_identical: int

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass
class DeviceGate:
    """The gate on the device's outputs: where they came from, on which images, and its outcome."""

    device: str
    description: str
    emulated: bool
    machine: str
    cpu: str
    qemu: str | None
    python: str
    versions: dict[str, str]
    artifacts: dict[str, str]  # artifact id -> the id its device outputs are gated under
    indices: list[int]
    images: list[str]
    selection: str
    reference: str
    reference_from: str
    outcome: GateOutcome
    differences: list[OutputDifference]
    scores: dict[str, list[float]]
    device_seconds: float
    host_seconds_per_image: dict[str, float] = field(default_factory=dict)
    image_seconds: dict[str, float] = field(default_factory=dict)  # per image inside the run (no start-up)
    infer_seconds: dict[str, float] = field(default_factory=dict)  # of which inference (no decode/preprocess)

    @property
    def device_gates(self) -> list[GateResult]:
        """The gates of the device's outputs (the outcome also gates the host's int8 outputs on the same images,
        so a subset's own noise is told apart from the device's kernels)."""
        return [g for g in self.outcome.gates if g.artifact in self.artifacts.values()]

    @property
    def verdict(self) -> str:
        verdicts = {g.verdict for g in self.device_gates}
        return FAIL if FAIL in verdicts else (INSUFFICIENT if INSUFFICIENT in verdicts else PASS)

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    @property
    def seconds_per_image(self) -> float:
        """Wall time of the device run per image and artifact (start-up included; emulator time, not latency)."""
        return self.device_seconds / max(1, len(self.images) * len(self.artifacts))

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "description": self.description, "emulated": self.emulated,
                "machine": self.machine, "cpu": self.cpu, "qemu": self.qemu, "python": self.python,
                "versions": self.versions, "artifacts": self.artifacts, "selection": self.selection,
                "indices": self.indices, "images": self.images, "n": len(self.images),
                "reference": self.reference, "reference_from": self.reference_from, "verdict": self.verdict,
                "gates": [g.to_dict() for g in self.device_gates],
                "host_gates_same_images": [g.to_dict() for g in self.outcome.gates if g not in self.device_gates],
                "host_vs_device": [d.to_dict() for d in self.differences], "scores": self.scores,
                "device_seconds": round(self.device_seconds, 2),
                "device_seconds_per_image": round(self.seconds_per_image, 3),
                "device_image_seconds": {k: round(v, 3) for k, v in self.image_seconds.items()},
                "device_infer_seconds": {k: round(v, 3) for k, v in self.infer_seconds.items()},
                "host_seconds_per_image": {k: round(v, 4) for k, v in self.host_seconds_per_image.items()},
                "note": ("emulator time, not device latency" if self.emulated else "measured on this machine")}


def select_images(labels: np.ndarray, n: int | None, seed: int = 0) -> tuple[np.ndarray, str]:
    """Indices of the gate images the device runs: all, or ``n`` drawn per class in proportion (at least one of
    each class when ``n`` >= 2), seeded; and how they were chosen, in words."""
    y = np.asarray(labels).astype(int)
    if n is None or n >= len(y):
        return np.arange(len(y)), "all gate images"
    if n < 1:
        raise UsageError(f"--device-images must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    share = {c: int(np.sum(y == c)) / len(y) for c in classes}
    take = {c: max(1 if n >= len(classes) else 0, round(n * share[c])) for c in classes}
    while sum(take.values()) > n:
        take[max(take, key=lambda c: take[c])] -= 1
    while sum(take.values()) < n:
        take[min(take, key=lambda c: take[c] / max(1, int(np.sum(y == c))))] += 1
    idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: take[c]] for c in classes])
    counts = ", ".join(f"{take[c]} of class {c}" for c in classes)
    return np.sort(idx).astype(int), f"seeded stratified sample of {n} of {len(y)} ({counts}; seed {seed})"


def _device_ids(bundle: Bundle, candidates: Sequence[str], profile_backends: Sequence[str]) -> list[str]:
    """The int8 files among ``candidates`` whose backend the device profile runs."""
    ids = [a for a in candidates if bundle.artifact(a).precision == "int8"
           and BACKEND_FOR_FORMAT[bundle.artifact(a).format] in profile_backends]
    if not ids:
        raise UsageError(f"no int8 artifact this device runs among {list(candidates)} "
                         f"(backends {list(profile_backends)}); --device gates int8 files")
    return ids


def _run_on_device(bundle: Bundle, ids: list[str], sources: list[str], cfg: DeviceGateConfig,
                   log: Log) -> tuple[dict[str, Any], dict[str, np.ndarray], float, dict[str, Any]]:
    """Run the worker as the device (emulated arm64 when this host is not one): result, outputs, seconds, info."""
    p = get_profile(cfg.device)
    emulated = want_emulation(p, "auto")
    request = {"bundle": str(bundle.root.resolve()), "images": [str(Path(s).resolve()) for s in sources],
               "artifacts": ids, "providers": list(p.runtime.providers), "threads": p.runtime.threads,
               "quality": False}
    info: dict[str, Any] = {"emulated": emulated, "cpu": p.cpu.qemu_cpu if emulated else platform.processor(),
                            "qemu": None}
    if emulated:
        from ..devices.emuroot import open_root

        root = open_root(cfg.cache)
        cmd, env = root.python_command(p, [])
        info["qemu"] = root.qemu.version_str
        log(f"device gate: {len(ids)} int8 file(s) x {len(sources)} images as {p.name} under QEMU "
            f"{root.qemu.version_str} -cpu {p.cpu.qemu_cpu} (emulated: slow)")
    else:
        cmd, env = native_prefix(), None
        log(f"device gate: {len(ids)} int8 file(s) x {len(sources)} images natively ({platform.machine()})")
    t0 = time.perf_counter()
    run = run_worker(cmd, request, env=env, timeout=cfg.timeout or 300 + 30 * len(sources) * len(ids))
    seconds = time.perf_counter() - t0
    if not run.ok or run.result is None:
        raise EmulationError(f"the {p.name} run failed ({run.killed_by or f'exit {run.returncode}'}): {run.error}")
    if p.arch == "aarch64" and run.result.get("machine") not in ("aarch64", "arm64"):
        raise EmulationError(f"the {p.name} run reports machine {run.result.get('machine')!r}, not aarch64")
    return run.result, run.outputs, seconds, info


def _difference(aid: str, bundle: Bundle, data: GateData, idx: np.ndarray, device_logits: np.ndarray,
                device_results: list[dict[str, Any]], threshold: float,
                settings: BackendSettings | None) -> tuple[OutputDifference, float]:
    """Host vs device outputs of one file on the device's images, and the host's seconds per image."""
    art = bundle.artifact(aid)
    x = relayout(data.tensors[idx], data.layout, art.layout)
    t0 = time.perf_counter()
    host, _ = run_backend(art.format, bundle.path(art), x, settings)
    host_s = (time.perf_counter() - t0) / max(1, len(idx))
    d = np.abs(host.astype(np.float64) - device_logits.astype(np.float64))
    lsb = output_lsb(art.format, bundle.path(art))
    p_host = referable_probability(host, data.positive)
    p_dev = referable_probability(device_logits, data.positive)
    same = sum(1 for i, r in enumerate(device_results)
               if r.get("input_sha256") == hashlib.sha256(np.ascontiguousarray(x[i : i + 1]).tobytes()).hexdigest())
    diff = OutputDifference(aid, len(idx), float(d.max()) if d.size else 0.0, lsb,
                            float(d.max() / lsb) if (lsb and d.size) else None,
                            float(np.max(np.abs(p_host - p_dev))) if len(idx) else 0.0,
                            int(np.sum((p_host >= threshold) != (p_dev >= threshold))), same)
    return diff, host_s


def device_gate(bundle: Bundle, sources: Sequence[str], data: GateData, host_scores: Mapping[str, np.ndarray],
                reference: str, threshold: float, criteria: GateCriteria, candidates: Sequence[str],
                cfg: DeviceGateConfig, settings: BackendSettings | None = None,
                mac_fractions: Mapping[str, float | None] | None = None, log: Log | None = None) -> DeviceGate:
    """Gate the int8 files among ``candidates`` on their device outputs. ``sources`` and ``data`` are the gate
    images (preprocessed on the host, in the same order); ``host_scores`` holds the reference's host scores."""
    say: Log = log or (lambda s: None)
    p = get_profile(cfg.device)
    if p.arch != "aarch64" and want_emulation(p, "auto"):
        raise UsageError(f"--device {p.name}: only Arm device profiles are emulated")
    ids = _device_ids(bundle, candidates, p.runtime.backends)
    idx, selection = select_images(data.labels, cfg.images, cfg.seed)
    chosen = [str(sources[i]) for i in idx]
    result, outputs, seconds, info = _run_on_device(bundle, ids, chosen, cfg, say)
    sub = replace(data, tensors=data.tensors[idx], labels=data.labels[idx], quality=None)
    tag = {aid: f"{aid}@{p.name}" for aid in ids}
    scores: dict[str, np.ndarray] = {reference: np.asarray(host_scores[reference])[idx]}
    diffs, host_s, image_s, infer_s = [], {}, {}, {}
    for aid in ids:
        logits = np.asarray(outputs[aid], dtype=np.float32)
        bad = [chosen[i] for i in np.flatnonzero(~np.all(np.isfinite(logits), axis=1))]
        if bad:
            raise EmulationError(f"{aid} gave no output on the device for {len(bad)} image(s) the host scored: "
                                 f"{bad[:3]}")
        scores[aid] = np.asarray(host_scores[aid])[idx]  # the host's int8 outputs on the same images
        scores[tag[aid]] = referable_probability(logits, data.positive)
        rows = result["artifacts"][aid]["results"]
        image_s[aid] = float(np.mean([sum(v for v in (r.get("timings_ms") or {}).values()
                                          if isinstance(v, (int, float))) for r in rows])) / 1e3
        infer_s[aid] = float(np.mean([(r.get("timings_ms") or {}).get("infer", np.nan) for r in rows])) / 1e3
        diff, host_s[aid] = _difference(aid, bundle, data, idx, logits, rows, threshold, settings)
        diffs.append(diff)
    fractions = {t: (mac_fractions or {}).get(a) for a in ids for t in (a, tag[a])}
    outcome = gate_scores(scores, sub, reference, threshold, criteria, fractions)
    return DeviceGate(p.name, p.description, info["emulated"], str(result.get("machine")), info["cpu"],
                      info["qemu"], str(result.get("python")), dict(result.get("versions") or {}), tag,
                      [int(i) for i in idx], chosen, selection, reference,
                      f"host {platform.machine()} ({platform.python_implementation()} {platform.python_version()})",
                      outcome, diffs, {k: [float(v) for v in s] for k, s in scores.items()}, seconds, host_s,
                      image_s, infer_s)


def device_lines(d: DeviceGate) -> list[str]:
    """What ``check`` prints about the device gate."""
    v = d.versions
    where = (f"arm64 emulated (QEMU {d.qemu}, -cpu {d.cpu})" if d.emulated else f"{d.machine}, not emulated")
    lines = [f"device gate on {d.device} ({where}; Python {d.python} {d.machine}, "
             + ", ".join(f"{k} {v[k]}" for k in ("onnxruntime", "ai-edge-litert", "numpy") if k in v) + ")",
             f"  images: {d.selection}; fp32 reference {d.reference} from the {d.reference_from}",
             f"  device run {d.device_seconds:.1f} s in all ({d.seconds_per_image:.2f} s per image and file with "
             "start-up; per image: " + ", ".join(f"{k} {s:.2f} s ({d.infer_seconds.get(k, float('nan')):.2f} s "
                                                 "inference)" for k, s in d.image_seconds.items())
             + (", emulator time, not device latency" if d.emulated else "")
             + "); host inference per image: "
             + ", ".join(f"{k} {s * 1e3:.0f} ms" for k, s in d.host_seconds_per_image.items())]
    for diff in d.differences:
        lsb = f" ({diff.max_lsb:.2f} LSB)" if diff.max_lsb is not None else ""
        lines.append(f"  {diff.artifact} host vs device: max |Δlogit| {diff.max_abs_logit:.2e}{lsb}, max |Δp| "
                     f"{diff.max_abs_probability:.2e}, decisions differ {diff.decisions_differ}/{diff.n}, inputs "
                     f"identical {diff.inputs_identical}/{diff.n}")
    for g in d.outcome.gates:
        on = "device outputs" if g in d.device_gates else "host outputs, same images"
        lines.append(f"  gate {g.artifact} ({on}) vs {g.reference}: ΔAUC {g.delta_auc:+.4f}, Δsens "
                     f"{g.delta_sensitivity:+.4f}, Δspec {g.delta_specificity:+.4f}, flips {g.flips}/"
                     f"{g.candidate_eval.n} -> {g.verdict}")
        lines += [f"    FAIL: {m}" for m in g.failures] + [f"    not shown: {m}" for m in g.insufficient]
    lines.append(f"  device gate: {d.verdict}")
    return lines


__all__ = ["DeviceGate", "DeviceGateConfig", "OutputDifference", "device_gate", "device_lines", "select_images"]
