"""``fundus-edge bench``: per-stage latency, throughput, cold start and peak RSS per artifact of a bundle."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any


def camera_sized_jpegs(folder: Path, n: int = 2, size: tuple[int, int] = (4000, 3000)) -> list[str]:
    """Synthetic fundus photos at a handheld camera's resolution (12 MP by default), JPEG quality 95."""
    from ..datasets.synthetic import camera_photo

    out = []
    for i in range(n):
        p = folder / f"camera_{size[0]}x{size[1]}_{i}.jpg"
        p.write_bytes(camera_photo(900 + i, size))
        out.append(str(p))
    return out


def bench_images(given: list[str] | None, folder: Path) -> list[str]:
    """The images a benchmark times: those given, else two 12 MP synthetic photos written to ``folder`` plus the
    sample photos when the checkout has them (a warning says when it does not)."""
    from ..datasets.open_fundus import SAMPLES, SAMPLES_HELP
    from ..runtime.screen import expand_inputs
    from .output import warn

    images = expand_inputs(given) if given else []
    if not images:
        images = camera_sized_jpegs(folder)
        if SAMPLES.is_dir():
            images += expand_inputs([SAMPLES])
        else:
            warn(f"12 MP synthetic photos only: {SAMPLES_HELP}")
    return images


def cmd_bench(args: argparse.Namespace) -> int:
    from ..bundle.read import load_bundle
    from ..devices.projection import DEFAULT_DEVICES, LABEL, format_projection, project_artifacts
    from ..runtime.backends import BackendSettings
    from ..runtime.bench import bundle_macs, format_table, run_bench

    if args.project:  # an unknown device fails before the benchmark runs, not after
        from ..devices.profile import get_profile

        for name in args.project:
            get_profile(name)

    with tempfile.TemporaryDirectory(prefix="fe-bench-") as tmp:
        images = bench_images(args.images, Path(tmp))
        rows = run_bench(args.bundle, images, BackendSettings(threads=args.threads), args.artifacts,
                         repeats=args.repeats, cold=not args.no_cold_start)
    devices = DEFAULT_DEVICES if args.project is None else tuple(args.project)
    macs, macs_source = bundle_macs(load_bundle(args.bundle))
    projections = project_artifacts(macs, [(r.artifact, r.precision) for r in rows], devices)
    payload: dict[str, Any] = {"bundle": str(args.bundle), "threads": args.threads, "images": len(images),
                               "rows": [r.to_dict() for r in rows], "skipped": list(rows.skipped),
                               "projection": {"label": LABEL, "macs": macs, "macs_source": macs_source,
                                              "devices": list(devices),
                                              "rows": [p.to_dict() for p in projections]}}
    for r in payload["rows"]:
        r["projection"] = {p.device: {"bound_ms": p.bound_ms, "projected_ms": p.projected_ms}
                           for p in projections if p.artifact == r["artifact"]}
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(f"{len(images)} images x {args.repeats} warm runs, {args.threads} inference thread(s)")
        print(format_table(rows))
        if devices:
            print()
            print(format_projection(projections, macs, macs_source, devices))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("bench", help="per-stage latency, throughput, cold start and peak RSS of a bundle")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("images", nargs="*", help="images or folders (default: 12 MP synthetic + CC0 photos)")
    p.add_argument("--artifact", action="append", dest="artifacts", metavar="ID",
                   help="artifact id to benchmark; repeat for more (default: all)")
    p.add_argument("--artifacts", nargs="+", dest="artifacts", help=argparse.SUPPRESS)  # old spelling
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-cold-start", action="store_true", help="skip the fresh-process cold start / RSS run")
    p.add_argument("--project", nargs="*", metavar="DEVICE",
                   help="device profiles for the inference projection table (default: rpi4 rpi5 jetson-orin-nano; "
                        "--project alone: no table); a projection from the model's MACs, not a measurement")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench)
