"""``fundus-edge bench``: per-stage latency, throughput, cold start and peak RSS per artifact of a bundle."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any


def camera_sized_jpegs(folder: Path, n: int = 2, size: tuple[int, int] = (4000, 3000)) -> list[str]:
    """Synthetic fundus photos at a handheld camera's resolution (12 MP by default), JPEG quality 95."""
    from .datasets.synthetic import camera_photo

    out = []
    for i in range(n):
        p = folder / f"camera_{size[0]}x{size[1]}_{i}.jpg"
        p.write_bytes(camera_photo(900 + i, size))
        out.append(str(p))
    return out


def cmd_bench(args: argparse.Namespace) -> int:
    from .cli import SAMPLES
    from .runtime.backends import BackendSettings
    from .runtime.bench import format_table, run_bench
    from .runtime.screen import expand_inputs

    with tempfile.TemporaryDirectory(prefix="fe-bench-") as tmp:
        images = expand_inputs(args.images) if args.images else []
        if not images:
            images = camera_sized_jpegs(Path(tmp))
            if SAMPLES.is_dir():
                images += expand_inputs([SAMPLES])
        rows = run_bench(args.bundle, images, BackendSettings(threads=args.threads), args.artifacts,
                         repeats=args.repeats, cold=not args.no_cold_start)
    payload: dict[str, Any] = {"bundle": str(args.bundle), "threads": args.threads, "images": len(images),
                               "rows": [r.to_dict() for r in rows]}
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(f"{len(images)} images x {args.repeats} warm runs, {args.threads} inference thread(s)")
        print(format_table(rows))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="per-stage latency, throughput, cold start and peak RSS of a bundle")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("images", nargs="*", help="images or folders (default: 12 MP synthetic + CC0 photos)")
    p.add_argument("--artifacts", nargs="*", help="artifact ids (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-cold-start", action="store_true", help="skip the fresh-process cold start / RSS run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
