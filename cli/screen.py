"""``fundus-edge screen``: screen photographs with a bundle (torch-free); field options hand over to
:mod:`.field` (result store, watch mode, patient fields, signed bundles)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import ImageError, UsageError
from .choices import decode_limits_for, pipeline_settings, screen_choices, use_pipeline
from .field import screen_field, wants_field
from .output import Progress, emit, screening_line, screening_summary, warn


def cmd_screen(args: argparse.Namespace) -> int:
    from ..runtime import expand_inputs, load

    if wants_field(args):  # result store, watch mode, patient fields, trust policy
        return screen_field(args)
    if not args.inputs:
        raise UsageError("give image files or directories to screen (or --watch DIR with --store DB)")
    sources = expand_inputs(args.inputs)
    loaded: list[Any] = []

    def load_once() -> Any:
        from ..bundle.read import load_bundle

        loaded.append(load_bundle(args.bundle))
        return loaded[-1]

    artifact, fmt, settings = screen_choices(args, load_once)
    pipeline = use_pipeline(args.pipeline, len(sources))
    bundle: Any = loaded[0] if loaded else args.bundle
    screener = load(bundle, artifact=artifact, fmt=fmt, precision=args.precision,
                    settings=pipeline_settings(settings, pipeline), decode_limits=decode_limits_for(args))
    if screener.artifact_note:  # the default artifact's backend is not installed here: another one runs
        warn(screener.artifact_note)
    results = _run(args, screener, sources, pipeline)
    n_err = sum(1 for r in results if not r)
    summary = {"n": len(results), "refer": sum(r.decision == "refer" for r in results),
               "no_refer": sum(r.decision == "no-refer" for r in results),
               "ungradable": sum(r.decision == "ungradable" for r in results), "errors": n_err}
    payload = {"bundle_id": screener.bundle.bundle_id, "artifact": screener.artifact.id,
               "backend": screener.backend.name, "results": [r.to_dict() for r in results], "summary": summary,
               **({"artifact_note": screener.artifact_note} if screener.artifact_note else {})}
    if args.jsonl:
        print(json.dumps({"summary": summary}), flush=True)
    else:
        emit(args, payload, screening_summary(summary))
    return ImageError.exit_code if n_err else 0


def _run(args: argparse.Namespace, screener: Any, sources: list[str], pipeline: bool) -> list[Any]:
    """Screen every source. Text mode and --jsonl print each result as it is made (an interrupted batch has shown
    what it did); with --json a TTY on stderr shows progress instead, and stdout gets one document at the end."""
    results = []
    progress = Progress(len(sources)) if args.json else None
    if not args.json and not args.jsonl:
        print(f"bundle {screener.bundle.bundle_id}, artifact {screener.artifact.id} ({screener.backend.name})",
              flush=True)
    with screener:
        for r in screener.screen_many(sources, pipeline=pipeline):
            results.append(r)
            if progress is not None:
                progress.step()
            elif args.jsonl:
                print(json.dumps({"result": r.to_dict()}), flush=True)
            else:
                print(screening_line(r), flush=True)
    if progress is not None:
        progress.done()
    return results


def register(sub: Any) -> None:
    s = sub.add_parser("screen", help="screen images with a bundle (torch-free)")
    s.add_argument("--bundle", required=True, type=Path)
    s.add_argument("inputs", nargs="*", help="image files or directories")
    s.add_argument("--artifact", help="artifact id (default: the bundle's default)")
    s.add_argument("--format", choices=["onnx", "tflite"], help="pick an artifact by format")
    s.add_argument("--backend", choices=["onnxruntime", "litert"],
                   help="pick an artifact by the backend that runs it (onnxruntime: onnx, litert: tflite)")
    s.add_argument("--precision", choices=["fp32", "int8"], help="pick an artifact by precision")
    s.add_argument("--threads", type=int, help="inference threads (0: backend default; default 1, or the device's)")
    s.add_argument("--device", help="device profile name, a profile .toml, or 'auto': picks the artifact and "
                   "threads/providers (see 'fundus-edge devices')")
    s.add_argument("--pipeline", choices=["auto", "on", "off"], default="auto",
                   help="decode the next image while this one is inferred (auto: with 2+ images and 2+ cores); "
                        "the results are the same, in the same order")
    out = s.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON document on stdout, at the end")
    out.add_argument("--jsonl", action="store_true",
                     help="JSON lines on stdout as results are made: {\"result\": ...} per image, then "
                          "{\"summary\": ...}")
    s.add_argument("--out-dir", type=Path, metavar="DIR",
                   help="segmentation bundles: where each photo's NAME.vessels.png mask and NAME.overlay.png go "
                        "(default ./fundus-edge-vessels)")
    _field_options(s)
    s.set_defaults(func=cmd_screen)


def _field_options(screen: argparse.ArgumentParser) -> None:
    g = screen.add_argument_group("field use: result store, watch mode, patient fields, signed bundles")
    g.add_argument("--store", type=Path, metavar="DB",
                   help="SQLite result store: every screening recorded; an image already screened under this "
                        "bundle is not screened again")
    g.add_argument("--audit-log", type=Path, metavar="FILE",
                   help="append-only audit log (default: next to --store as NAME.audit.jsonl)")
    g.add_argument("--patient-id", help="stored with every result of this run (never printed or logged); NOTE: a "
                   "command-line argument is visible to every local user in 'ps': prefer --patient-id-file or "
                   "$FUNDUS_EDGE_PATIENT_ID")
    g.add_argument("--patient-id-file", type=Path, metavar="FILE",
                   help="read the patient ID from the first line of FILE (keep it mode 600)")
    g.add_argument("--eye", help="left/right (also L, R, OS, OD); stored with every result of this run")
    g.add_argument("--show-patient", action="store_true", help="include patient fields in --json output")
    g.add_argument("--watch", type=Path, metavar="DIR", help="screen files as they appear in DIR (needs --store)")
    g.add_argument("--after", choices=("keep", "move", "mark"), default="keep",
                   help="what to do with a processed file in watch mode (default keep)")
    g.add_argument("--move-to", type=Path, metavar="DIR", help="with --after move: destination (failed/ inside)")
    g.add_argument("--poll", type=float, default=1.0, help="watch: seconds between directory scans")
    g.add_argument("--settle", type=float, default=2.0,
                   help="watch: a file must be unchanged this many seconds before it is read")
    g.add_argument("--grace", type=float, default=60.0,
                   help="watch: a file with no proper end (JPEG EOI, PNG IEND) is taken after this many seconds")
    g.add_argument("--exit-when-idle", action="store_true", help="watch: exit once nothing is left to screen")
    g.add_argument("--trusted-keys", type=Path, metavar="DIR", help="directory of trusted public keys (.pub)")
    g.add_argument("--require-signature", action="store_true",
                   help="refuse bundles not signed by a trusted key (needs fundus-edge[secure])")
    g.add_argument("--device-config", type=Path, metavar="TOML",
                   help="device config; its [security] table sets trusted_keys and require_signature")
