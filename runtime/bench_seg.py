"""``fundus-edge bench`` on a segmentation (vessel) bundle: what segmenting one photo costs on this machine.

Per artifact: p50/p95 of every stage over warm runs (image-quality check; ``prepare``: decode, FOV crop and
scale, colour, CLAHE, tiles; ``infer``: every tile through the backend; ``stitch``: blend the tiles back into the
working-resolution probability map; ``biomarkers``; ``write``: the mask and overlay PNGs), end-to-end p50,
photos per second, the tiles per photo, and, in a fresh child process, cold start (process start to the first
segmented photo) and that child's peak RSS (VmHWM). Torch-free: it runs on the device with the runtime install.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..bundle.read import Bundle, load_bundle
from .backends import BackendSettings
from .bench import BenchRow, BenchRows, StageStats, runnable_artifacts
from .dense import prepare

SEG_STAGES = ("quality", "prepare", "infer", "stitch", "biomarkers", "write")


def tile_counts(bundle: Bundle, images: list[str]) -> list[str]:
    """One line per photo: its size and how many tiles of the bundle's dense spec it takes."""
    dense = bundle.spec.dense
    assert dense is not None
    out = []
    for img in images:
        g = prepare(img, dense).geometry
        out.append(f"{Path(img).name}: {g.original_size[0]}x{g.original_size[1]} px -> working "
                   f"{g.working_size[0]}x{g.working_size[1]}, {len(g.tiles)} tile(s) of "
                   f"{dense.tile or 'whole image'} px")
    return out


def bench_seg_artifact(bundle: Bundle, artifact_id: str, images: list[str], settings: BackendSettings,
                       warmup: int = 1, repeats: int = 3) -> BenchRow:
    """Warm per-stage timings of one artifact over ``images`` x ``repeats`` (photos judged ungradable by the
    quality check are left out of the timings, and said so)."""
    from .segment import load_segmenter

    art = bundle.artifact(artifact_id)
    stages: dict[str, list[float]] = {s: [] for s in SEG_STAGES}
    e2e: list[float] = []
    n_ungradable = 0
    with tempfile.TemporaryDirectory(prefix="fe-bench-seg-") as tmp, \
            load_segmenter(bundle, artifact=artifact_id, settings=settings) as seg:
        for img in images[:warmup]:
            seg.segment(img, Path(tmp))
        for _ in range(repeats):
            for img in images:
                t0 = time.perf_counter()
                r = seg.segment(img, Path(tmp))
                ms = (time.perf_counter() - t0) * 1e3
                if r.error:
                    raise RuntimeError(f"bench image {img} failed: {r.error}")
                if r.decision != "segmented":
                    n_ungradable += 1
                    continue
                e2e.append(ms)
                for s in SEG_STAGES:
                    stages[s].append(r.timings_ms.get(s, 0.0))
    if not e2e:
        raise RuntimeError("every bench photo was judged ungradable by the bundle's quality check: nothing was "
                           "segmented; give gradable fundus photos")
    size = bundle.path(art).stat().st_size / 1e6
    row = BenchRow(art.id, art.format, art.precision, size, len(images), repeats,
                   {s: StageStats.of(v) for s, v in stages.items()}, StageStats.of(e2e), len(e2e) / (sum(e2e) / 1e3))
    if n_ungradable:
        row.notes.append(f"{n_ungradable} of {n_ungradable + len(e2e)} runs were ungradable (not segmented): left "
                         "out of the timings")
    return row


COLD_CHILD = """
import json, sys
from fundus_edge.runtime.backends import BackendSettings
from fundus_edge.runtime.bench import peak_rss_mb
from fundus_edge.runtime.segment import load_segmenter
seg = load_segmenter(sys.argv[1], artifact=sys.argv[2], settings=BackendSettings(threads=int(sys.argv[4])))
r = seg.segment(sys.argv[3], None)
print(json.dumps({"ok": bool(r), "decision": r.decision, "rss": peak_rss_mb()}), flush=True)
"""


def seg_cold_start(bundle_path: Path, artifact_id: str, image: str, threads: int
                   ) -> tuple[float, float | None, str | None]:
    """Seconds from spawning a fresh interpreter to its result for ``image`` (no PNGs written), that child's
    peak RSS in MB, and its decision ("segmented", or "ungradable": then nothing was inferred)."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", COLD_CHILD, str(bundle_path), artifact_id, image, str(threads)],
                          capture_output=True, text=True, env=dict(os.environ), check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"cold-start child failed: {proc.stderr.strip()[-500:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return elapsed, out["rss"], out["decision"]


def _cold(row: BenchRow, bundle_path: Path, images: list[str], threads: int) -> None:
    """Cold start and peak RSS of the first image the child segments (an ungradable one infers nothing)."""
    for img in images:
        seconds, rss, decision = seg_cold_start(bundle_path, row.artifact, img, threads)
        if decision == "segmented":
            row.cold_start_s, row.peak_rss_mb = seconds, rss
            row.notes.append(f"cold start and peak RSS: segmenting {Path(img).name}")
            return
    row.notes.append("no cold start / peak RSS: the quality check judged every photo ungradable")


def run_seg_bench(bundle_path: str | os.PathLike[str], images: list[str], settings: BackendSettings,
                  artifacts: list[str] | None = None, repeats: int = 3, cold: bool = True) -> BenchRows:
    """One row per artifact (default: every artifact whose backend is installed here; the rest in ``.skipped``).
    The cold start / peak RSS child segments the first image."""
    bundle = load_bundle(bundle_path)
    ids, skipped = runnable_artifacts(bundle, artifacts)
    rows = BenchRows(skipped=skipped)
    for artifact_id in ids:
        row = bench_seg_artifact(bundle, artifact_id, images, settings, repeats=repeats)
        if cold:
            _cold(row, Path(bundle_path), images, settings.threads)
        rows.append(row)
    return rows


def format_seg_table(rows: list[BenchRow], tiles: list[str]) -> str:
    cols = "".join(f" {s:>15}" for s in SEG_STAGES)
    head = f"{'artifact':<16} {'MB':>6}{cols} {'e2e p50':>9} {'img/s':>6} {'cold s':>7} {'RSS MB':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f" {r.stages_ms[s].p50:7.1f}/{r.stages_ms[s].p95:7.1f}" for s in SEG_STAGES)
        cold = f"{r.cold_start_s:7.2f}" if r.cold_start_s is not None else "      -"
        rss = f"{r.peak_rss_mb:7.1f}" if r.peak_rss_mb is not None else "      -"
        lines.append(f"{r.artifact:<16} {r.file_mb:6.2f}{cells} {r.e2e_ms.p50:9.1f} {r.throughput_ips:6.2f} "
                     f"{cold} {rss}")
    lines.append("stage columns: p50/p95 ms over warm runs; cold = fresh process to the first segmented photo; RSS = "
                 "that process's peak (VmHWM)")
    lines += tiles
    for r in rows:
        lines += [f"{r.artifact}: {note}" for note in r.notes]
    lines += list(getattr(rows, "skipped", []))
    return "\n".join(lines)


def stage_summary(rows: list[BenchRow]) -> dict[str, dict[str, float]]:
    """artifact id -> stage -> p50 ms (for JSON readers that want the numbers flat)."""
    return {r.artifact: {s: float(np.round(r.stages_ms[s].p50, 3)) for s in SEG_STAGES} for r in rows}
