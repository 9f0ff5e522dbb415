"""``fundus-edge bench``: what a screening costs on this machine, per stage and per artifact.

Per artifact of a bundle: p50/p95 of every stage over warm runs (decode, field-of-view crop + resize +
normalise, inference, post-processing), end-to-end p50, throughput, model file size, and — in a fresh child
process — cold start (process start to first result) and peak RSS (VmHWM of the child, not the parent's).
Torch-free: it runs on the device with the runtime install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .backends import BackendSettings
from .bundle import Bundle, load_bundle

STAGES = ("decode", "preprocess", "infer", "postprocess")


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
    with load(bundle, artifact=artifact_id, settings=settings) as screener:
        for img in images[:warmup]:
            screener.screen(img)
        t_all = time.perf_counter()
        n = 0
        for _ in range(repeats):
            for img in images:
                t0 = time.perf_counter()
                r = screener.screen(img)
                e2e.append((time.perf_counter() - t0) * 1e3)
                n += 1
                if r.error:
                    raise RuntimeError(f"bench image {img} failed: {r.error}")
                for s in STAGES:
                    stages[s].append(r.timings_ms.get(s, 0.0))
        wall = time.perf_counter() - t_all
    size = bundle.path(art).stat().st_size / 1e6
    return BenchRow(art.id, art.format, art.precision, size, len(images), repeats,
                    {s: StageStats.of(v) for s, v in stages.items()}, StageStats.of(e2e), n / wall)


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


def run_bench(bundle_path: str | os.PathLike[str], images: list[str], settings: BackendSettings,
              artifacts: list[str] | None = None, repeats: int = 3, cold: bool = True) -> list[BenchRow]:
    bundle = load_bundle(bundle_path)
    ids = artifacts or [a.id for a in bundle.artifacts]
    rows = []
    for artifact_id in ids:
        row = bench_artifact(bundle, artifact_id, images, settings, repeats=repeats)
        if cold:
            row.cold_start_s, row.peak_rss_mb = cold_start(Path(bundle_path), artifact_id, images[0],
                                                           settings.threads)
        rows.append(row)
    return rows


def format_table(rows: list[BenchRow]) -> str:
    head = (f"{'artifact':<12} {'MB':>6} {'decode':>13} {'preprocess':>13} {'infer':>13} {'post':>6} "
            f"{'e2e p50':>8} {'img/s':>7} {'cold s':>7} {'RSS MB':>7}")
    lines = [head, "-" * len(head)]
    def pp(r: BenchRow, s: str) -> str:
        st = r.stages_ms[s]
        return f"{st.p50:6.2f}/{st.p95:6.2f}"

    for r in rows:
        cold = f"{r.cold_start_s:7.3f}" if r.cold_start_s is not None else "      -"
        rss = f"{r.peak_rss_mb:7.1f}" if r.peak_rss_mb is not None else "      -"
        lines.append(f"{r.artifact:<12} {r.file_mb:6.2f} {pp(r, 'decode'):>13} {pp(r, 'preprocess'):>13} "
                     f"{pp(r, 'infer'):>13} {r.stages_ms['postprocess'].p50:6.3f} {r.e2e_ms.p50:8.2f} "
                     f"{r.throughput_ips:7.1f} {cold} {rss}")
    lines.append("stage columns: p50/p95 ms over warm runs; cold = fresh process to first result; RSS = that "
                 "process's peak (VmHWM)")
    return "\n".join(lines)
