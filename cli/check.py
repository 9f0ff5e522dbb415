"""``fundus-edge check`` (re-run a bundle's clinical gate on any labelled set) and ``info`` (verify a bundle
and summarise its manifest). Torch-free."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .choices import backend_settings
from .output import emit


def cmd_check(args: argparse.Namespace) -> int:
    import sys

    from ..pipeline.check import run_check
    from .check_format import format_check

    device = None
    if args.device:
        from ..pipeline.device_gate import DeviceGateConfig

        device = DeviceGateConfig(args.device, args.device_images, args.device_seed)
    stability = None
    if args.stability:
        from ..errors import UsageError
        from ..quantization.stability import StabilityConfig

        if args.calib is None:
            raise UsageError("--stability K needs --calib DIR: the calibration images the K subsets are drawn from")
        stability = StabilityConfig(args.stability, args.calib, args.calib_size, args.stability_seed)
    result = run_check(args.bundle, args.val, args.val_images, settings=backend_settings(args),
                       referable_from=args.referable_from, artifacts=args.artifacts, device=device,
                       log=lambda s: print(s, file=sys.stderr, flush=True), stability=stability)
    emit(args, result.to_dict(), format_check(result))
    from ..errors import GateFailedError, GateInsufficientEvidenceError

    return {"PASS": 0, "INSUFFICIENT EVIDENCE": GateInsufficientEvidenceError.exit_code}.get(
        result.verdict, GateFailedError.exit_code)


def _model_name(model: dict[str, Any]) -> str:
    """The architecture, or for a brought file its format and sha256 prefix."""
    if model.get("arch"):
        return str(model["arch"])
    if model.get("source_format"):
        return f"brought {model['source_format']} file (sha256 {str(model.get('source_sha256'))[:12]})"
    return "unknown architecture"


def cmd_info(args: argparse.Namespace) -> int:
    from ..bundle.read import load_bundle

    b = load_bundle(args.bundle)
    m = b.manifest
    lines = [f"bundle {b.bundle_id} (schema {m['schema_version']}), created {m.get('created')}, all "
             f"{len(m['files'])} files verified",
             f"model: {_model_name(m['model'])} classes {b.class_names}, referable {b.positive_classes}",
             f"input: {m['input']['shape']} {m['input']['layout']}; preprocessing size {b.preprocessing.size}",
             f"operating point: threshold {b.operating_point.threshold:.4f} ({b.operating_point.rule})",
             f"gate: {m['gate'].get('verdict') or ('PASS' if m['gate']['passed'] else 'FAIL')}"
             + (" (built with --allow-failed-gate)" if m["gate"].get("allow_failed_gate") else "")
             + (" (built with --allow-insufficient-evidence)" if m["gate"].get("allow_insufficient_evidence") else "")]
    for a in b.artifacts:
        mark = " (default)" if a.id == m.get("default_artifact") else ""
        lines.append(f"  {a.id:<11} {a.path:<18} {a.format}/{a.precision} {a.layout} {a.io_dtype} I/O{mark}")
    emit(args, {"bundle_id": b.bundle_id, "manifest": m, "verified": True}, "\n".join(lines))
    return 0


def register(sub: Any) -> None:
    c = sub.add_parser("check", help="re-run the clinical gate of a bundle on any labelled set (torch-free)")
    c.add_argument("--bundle", required=True, type=Path)
    c.add_argument("--val", required=True, type=Path)
    c.add_argument("--val-images", type=Path)
    c.add_argument("--referable-from", type=int, default=2)
    c.add_argument("--artifact", action="append", dest="artifacts", metavar="ID",
                   help="artifact id to check; repeat for more (default: all)")
    c.add_argument("--artifacts", nargs="+", dest="artifacts", help=argparse.SUPPRESS)  # old spelling
    c.add_argument("--threads", type=int, default=0)
    c.add_argument("--device", metavar="PROFILE",
                   help="also gate the int8 files on that device's own kernels: an Arm profile (e.g. rpi4) runs "
                        "them with the real aarch64 wheels under QEMU (slow: see docs/gate.md)")
    c.add_argument("--device-images", type=int, metavar="N",
                   help="with --device: gate on a seeded stratified sample of N images (default: all)")
    c.add_argument("--device-seed", type=int, default=0, help="seed of the --device-images sample (default 0)")
    c.add_argument("--stability", type=int, metavar="K", default=0,
                   help="re-quantize the ONNX int8 file on K calibration subsets of --calib and report the spread "
                        "of ΔAUC and flips; flags an unstable file (needs onnx; see docs/gate.md)")
    c.add_argument("--calib", type=Path, help="with --stability: the folder of calibration images")
    c.add_argument("--calib-size", type=int, help="with --stability: images per subset (default: the build's)")
    c.add_argument("--stability-seed", type=int, default=1, help="subset i is drawn with this seed + i (default 1)")
    c.add_argument("--json", action="store_true", help="one JSON document on stdout")
    c.set_defaults(func=cmd_check)

    i = sub.add_parser("info", help="verify a bundle and print its manifest summary")
    i.add_argument("--bundle", required=True, type=Path)
    i.add_argument("--json", action="store_true", help="one JSON document on stdout")
    i.set_defaults(func=cmd_info)
