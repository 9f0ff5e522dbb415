"""``fundus-edge bench``: what a screening costs on this machine, per stage and per artifact.

Per artifact of a bundle: p50/p95 of every stage over warm runs (decode, field-of-view crop + resize +
normalise, image-quality check, inference, post-processing), end-to-end p50, throughput, model file size, and —
in a fresh child process — cold start (process start to first result) and peak RSS (VmHWM of the child, not the
parent's). The quality check's share is measured side by side: each image is screened with the bundle's
quality spec and with the check switched off, alternately, and the end-to-end p50s are compared on the
gradable images (an ungradable image skips inference, which would flatter the check).
Torch-free: it runs on the device with the runtime install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle.read import Bundle, load_bundle
from ..errors import MissingDependencyError
from .backends import BACKENDS_BY_FORMAT, EXTRA_FOR_FORMAT, BackendSettings, install_hint, installed_formats

STAGES = ("decode", "preprocess", "quality", "infer", "postprocess")


@dataclass
class StageStats:
    p50: float
    p95: float
    mean: float

    @classmethod
    def of(cls, values: list[float]) -> StageStats:
        a = np.asarray(values, dtype=np.float64)
        return cls(float(np.percentile(a, 50)), float(np.percentile(a, 95)), float(a.mean()))


@dataclass
class BenchRow:
    artifact: str
    format: str
    precision: str
    file_mb: float
    n_images: int
    runs: int
    stages_ms: dict[str, StageStats]
    e2e_ms: StageStats
    throughput_ips: float
    cold_start_s: float | None = None
    peak_rss_mb: float | None = None
    notes: list[str] = field(default_factory=list)
    # End-to-end p50 with and without the image-quality check (gradable images only) and the relative overhead.
    quality_overhead: dict[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return d


def peak_rss_mb() -> float | None:
    """This process's peak resident set size (VmHWM) in MB, from /proc; None where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def bench_artifact(bundle: Bundle, artifact_id: str, images: list[str], settings: BackendSettings,
                   warmup: int = 2, repeats: int = 3) -> BenchRow:
    """Warm per-stage timings of one artifact over ``images`` x ``repeats``."""
    from .screen import load

    art = bundle.artifact(artifact_id)
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    e2e: list[float] = []
    with_q: list[float] = []
    without_q: list[float] = []
    cpu_with: list[float] = []
    cpu_without: list[float] = []
    n_ungradable = 0
    with load(bundle, artifact=artifact_id, settings=settings) as screener:
        spec_on = screener.quality
        spec_off = replace(spec_on, enabled=False)
        for img in images[:warmup]:
            screener.screen(img)
        n = 0
        for rep in range(repeats):
            for i, img in enumerate(images):
                # quality on and off alternate which goes first, so neither gets a systematic cache advantage
                off_first = spec_on.enabled and (rep + i) % 2 == 1
                off_run = _timed(screener, img, spec_off, spec_on) if off_first else None
                r, t_on, c_on = _timed(screener, img, spec_on, spec_on)
                e2e.append(t_on)
                n += 1
                if r.error:
                    raise RuntimeError(f"bench image {img} failed: {r.error}")
                for s in STAGES:
                    stages[s].append(r.timings_ms.get(s, 0.0))
                if not spec_on.enabled:
                    continue
                if r.decision == "ungradable":
                    n_ungradable += 1
                    continue
                off_run = off_run or _timed(screener, img, spec_off, spec_on)
                without_q.append(off_run[1])
                cpu_without.append(off_run[2])
                with_q.append(t_on)
                cpu_with.append(c_on)
    size = bundle.path(art).stat().st_size / 1e6
    overhead = None
    if with_q:
        on, off = float(np.median(with_q)), float(np.median(without_q))
        cpu_on, cpu_off = float(np.median(cpu_with)), float(np.median(cpu_without))
        overhead = {"e2e_p50_with_ms": on, "e2e_p50_without_ms": off, "overhead": on / off - 1.0,
                    "cpu_p50_with_ms": cpu_on, "cpu_p50_without_ms": cpu_off, "cpu_overhead": cpu_on / cpu_off - 1.0,
                    "quality_p50_ms": float(np.median(stages["quality"])), "n_gradable_runs": len(with_q),
                    "n_ungradable_runs": n_ungradable}
    row = BenchRow(art.id, art.format, art.precision, size, len(images), repeats,
                   {s: StageStats.of(v) for s, v in stages.items()}, StageStats.of(e2e), n / (sum(e2e) / 1e3),
                   quality_overhead=overhead)
    if n_ungradable:
        row.notes.append(f"{n_ungradable} of {n} runs were ungradable (no inference): left out of the overhead")
    return row


def _timed(screener: Any, img: str, spec: Any, restore: Any) -> tuple[Any, float, float]:
    """Screen ``img`` with the quality spec ``spec``: the result, wall and process CPU milliseconds."""
    screener.quality = spec
    t0, c0 = time.perf_counter(), time.process_time()
    r = screener.screen(img)
    ms, cpu = (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3
    screener.quality = restore
    return r, ms, cpu


def cold_start(bundle_path: Path, artifact_id: str, image: str, threads: int) -> tuple[float, float | None]:
    """Seconds from spawning a fresh interpreter to its first screening result, and that child's peak RSS."""
    code = (
        "import sys, json\n"
        "from fundus_edge.runtime import load, BackendSettings\n"
        "from fundus_edge.runtime.bench import peak_rss_mb\n"
        f"s = load({str(bundle_path)!r}, artifact={artifact_id!r}, settings=BackendSettings(threads={threads}))\n"
        f"r = s.screen({image!r})\n"
        "print(json.dumps({'ok': bool(r), 'rss': peak_rss_mb()}), flush=True)\n"
    )
    env = dict(os.environ)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start child failed: {proc.stderr.strip()[-500:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return elapsed, out["rss"]


class BenchRows(list[BenchRow]):
    """The rows of a benchmark, plus the artifacts it left out (``skipped``: one sentence each)."""

    def __init__(self, rows: list[BenchRow] | None = None, skipped: list[str] | None = None) -> None:
        super().__init__(rows or [])
        self.skipped: list[str] = list(skipped or [])


def runnable_artifacts(bundle: Bundle, artifacts: list[str] | None) -> tuple[list[str], list[str]]:
    """The artifact ids to benchmark and a note per artifact left out because its backend is not installed here.

    Ids given explicitly are all kept (a missing backend then fails with what to install); by default every
    artifact whose backend is installed. No artifact at all that can run is a MissingDependencyError."""
    if artifacts:
        return list(artifacts), []
    here = installed_formats()
    ids = [a.id for a in bundle.artifacts if a.format in here]
    skipped = [f"{a.id} not benchmarked: its backend ({BACKENDS_BY_FORMAT[a.format]}) is not installed here; "
               f"{install_hint(a.format)}" for a in bundle.artifacts if a.format not in here]
    if not ids:
        fmt = bundle.artifacts[0].format
        raise MissingDependencyError(BACKENDS_BY_FORMAT[fmt], EXTRA_FOR_FORMAT[fmt],
                                     f"Benchmarking this bundle ({', '.join(a.id for a in bundle.artifacts)})")
    return ids, skipped


def run_bench(bundle_path: str | os.PathLike[str], images: list[str], settings: BackendSettings,
              artifacts: list[str] | None = None, repeats: int = 3, cold: bool = True) -> BenchRows:
    """One row per artifact (default: every artifact whose backend is installed here; the rest in ``.skipped``)."""
    bundle = load_bundle(bundle_path)
    ids, skipped = runnable_artifacts(bundle, artifacts)
    rows = BenchRows(skipped=skipped)
    for artifact_id in ids:
        row = bench_artifact(bundle, artifact_id, images, settings, repeats=repeats)
        if cold:
            row.cold_start_s, row.peak_rss_mb = cold_start(Path(bundle_path), artifact_id, images[0],
                                                           settings.threads)
        rows.append(row)
    return rows


def bundle_macs(bundle: Bundle) -> tuple[int | None, str]:
    """MACs of one inference of the bundle's network, and where the number comes from.

    The manifest's ``compute.macs`` (counted on the fp32 ONNX at build time); for bundles built before that
    field, the MACs of a .tflite artifact counted from the file by the LiteRT interpreter when it is installed
    (the runtime has no onnx package to read an ONNX graph); otherwise None.
    """
    compute = bundle.spec.compute
    if compute is not None and compute.macs > 0:
        return compute.macs, f"manifest, counted on {compute.counted_on}"
    for art in bundle.artifacts:
        if art.format != "tflite":
            continue
        try:
            from .tflite_graph import inspect_tflite

            report = inspect_tflite(bundle.path(art))
        except Exception:  # no LiteRT here, or an unreadable file: fall through to "n/a"
            continue
        if report.integer_macs + report.float_macs > 0:
            return report.integer_macs + report.float_macs, f"counted on {art.path} (manifest has no MAC count)"
    return None, "the manifest has no MAC count (bundle built before it was recorded; rebuild it) and no .tflite " \
                 "artifact could be read"


def format_table(rows: list[BenchRow]) -> str:
    head = (f"{'artifact':<12} {'MB':>6} {'decode':>13} {'preprocess':>13} {'quality':>13} {'infer':>13} "
            f"{'post':>6} {'e2e p50':>8} {'img/s':>7} {'cold s':>7} {'RSS MB':>7}")
    lines = [head, "-" * len(head)]
    def pp(r: BenchRow, s: str) -> str:
        st = r.stages_ms[s]
        return f"{st.p50:6.2f}/{st.p95:6.2f}"

    for r in rows:
        cold = f"{r.cold_start_s:7.3f}" if r.cold_start_s is not None else "      -"
        rss = f"{r.peak_rss_mb:7.1f}" if r.peak_rss_mb is not None else "      -"
        lines.append(f"{r.artifact:<12} {r.file_mb:6.2f} {pp(r, 'decode'):>13} {pp(r, 'preprocess'):>13} "
                     f"{pp(r, 'quality'):>13} {pp(r, 'infer'):>13} {r.stages_ms['postprocess'].p50:6.3f} "
                     f"{r.e2e_ms.p50:8.2f} {r.throughput_ips:7.1f} {cold} {rss}")
    lines.append("stage columns: p50/p95 ms over warm runs; cold = fresh process to first result; RSS = that "
                 "process's peak (VmHWM)")
    for r in rows:
        q = r.quality_overhead
        if q:
            lines.append(f"{r.artifact}: image-quality check adds {q['overhead']:+.1%} to end-to-end screening "
                         f"(p50 {q['e2e_p50_with_ms']:.2f} ms with, {q['e2e_p50_without_ms']:.2f} ms without; process "
                         f"CPU time {q['cpu_overhead']:+.1%}; side by side over {q['n_gradable_runs']} gradable runs)")
        lines += [f"{r.artifact}: {note}" for note in r.notes]
    lines += list(getattr(rows, "skipped", []))
    return "\n".join(lines)
