"""``fundus-edge demo`` (the whole job on the built-in default) and ``synth`` (a synthetic data set)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .output import emit


def cmd_synth(args: argparse.Namespace) -> int:
    from ..datasets.synthetic import CAMERAS, write_dataset

    for c in args.cameras:
        if c not in CAMERAS:
            raise UsageError(f"unknown camera {c!r}; known: {sorted(CAMERAS)}")
    csv_path = write_dataset(args.out, args.n, args.seed, args.size, tuple(args.cameras))
    emit(args, {"labels": str(csv_path), "n": args.n}, f"wrote {args.n} synthetic images and {csv_path} "
          "(synthetic data: for testing the pipeline, not for clinical claims)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..datasets.open_fundus import find_root
    from .demo_run import run_demo

    return run_demo(args.out, data_root=find_root(args.data), json_out=args.json, force=True,
                    fragile=not args.skip_fragile)


def register(sub: Any) -> None:
    y = sub.add_parser("synth", help="write a synthetic fundus data set (for testing pipelines only)")
    y.add_argument("--out", required=True, type=Path)
    y.add_argument("--n", type=int, default=100)
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--size", type=int, default=384)
    y.add_argument("--cameras", nargs="+", default=["desktop", "handheld", "darkred"])
    y.add_argument("--json", action="store_true", help="one JSON document on stdout")
    y.set_defaults(func=cmd_synth)

    d = sub.add_parser("demo", help="the whole job: the real reference model gated and screened on real photographs, "
                       "then the PTQ-fragile synthetic models")
    d.add_argument("--out", type=Path, default=Path("demo-out"))
    d.add_argument("--data", type=Path, metavar="DIR",
                   help="the open-fundus folder (IDRiD, HRF); default: $FUNDUS_EDGE_OPEN_FUNDUS, ../shared/open-fundus "
                        "next to the checkout, else the repository's copy in tests/data/open-fundus-demo")
    d.add_argument("--json", action="store_true", help="one JSON document on stdout")
    d.add_argument("--skip-fragile", action="store_true",
                   help="skip the second part: the PTQ-fragile MobileNetV3 reference and the accuracy-aware fallback")
    d.set_defaults(func=cmd_demo)
