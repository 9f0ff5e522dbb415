"""``fundus-edge bench`` on a segmentation bundle: per-stage latency of one photo through tiling, photos per
second, cold start and peak RSS, per artifact (runtime/bench_seg.py). Torch-free."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any


def cmd_bench_seg(args: argparse.Namespace) -> int:
    from ..bundle.read import load_bundle
    from ..runtime.backends import BackendSettings
    from ..runtime.bench_seg import format_seg_table, run_seg_bench, stage_summary, tile_counts
    from .bench import bench_images

    notes = []
    if args.project:
        notes.append("no device projection for segmentation bundles: the manifest records no per-tile MAC count")
    with tempfile.TemporaryDirectory(prefix="fe-bench-") as tmp:
        images = bench_images(args.images, Path(tmp))
        rows = run_seg_bench(args.bundle, images, BackendSettings(threads=args.threads), args.artifacts,
                             repeats=args.repeats, cold=not args.no_cold_start)
        tiles = tile_counts(load_bundle(args.bundle), images)
    payload: dict[str, Any] = {"bundle": str(args.bundle), "task": "segmentation", "threads": args.threads,
                               "images": len(images), "tiles": tiles, "rows": [r.to_dict() for r in rows],
                               "stages_p50_ms": stage_summary(rows), "skipped": list(rows.skipped), "notes": notes}
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(f"{len(images)} images x {args.repeats} warm runs, {args.threads} inference thread(s), segmentation")
        print(format_seg_table(rows, tiles))
        for n in notes:
            print(f"note: {n}")
    return 0
