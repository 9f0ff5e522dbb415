"""The ``fundus-edge`` command line.

Exit codes: 0 success; 1 unexpected error; 2 usage; 3 missing dependency; 4 bundle unusable (schema,
checksum or signature); 5 model load; 6 export; 7 quantization; 8 clinical gate failed; 9 data; 10 some images
could not be screened (the others were); 11 runners disagree beyond tolerance (``compare``; x86 vs an emulated
device); 12 device (does not fit, unsupported, invalid profile); 13 emulation could not run; 14 the result store
is unusable. ``--json`` prints one JSON document on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import FundusEdgeError, ImageError, UsageError

# Further commands live in their own modules, each with ``register(subparsers)`` adding its sub-command(s).
# Registering must stay cheap: import heavy packages inside the command function, never at module level.
COMMAND_MODULES: tuple[str, ...] = (".quantize", ".bench", ".compare", ".quality", ".devices", ".field")

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
SAMPLES = PACKAGE_ROOT / "tests" / "data" / "fundus"


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2))
    else:
        print(text)


def _settings(args: argparse.Namespace) -> Any:
    from ..runtime.backends import BackendSettings

    return BackendSettings(threads=args.threads)


# ----------------------------------------------------------------------------------------------- screen
def _format_result(r: Any) -> str:
    name = Path(r.source).name
    if r.error:
        return f"{name:<28} ERROR     {r.error['code']}: {r.error['message']}"
    if r.decision == "ungradable":
        q = r.quality or {}
        return (f"{name:<28} UNGRADABLE no referral decision: {'; '.join(q.get('reasons', []))}\n"
                f"{'':<29}{q.get('hint') or ''}")
    t = r.timings_ms
    fov = "" if r.fov and r.fov.get("found") else "  (no field of view found: centre crop)"
    return (f"{name:<28} {r.decision.upper():<9} p(referable)={r.probability:.3f} (threshold {r.threshold:.3f})"
            f"  decode {t['decode']:.1f} ms, preprocess {t['preprocess']:.1f} ms, infer {t['infer']:.1f} ms{fov}")


def screen_choices(args: argparse.Namespace, get_bundle: Callable[[], Any]) -> tuple[str | None, str | None, Any]:
    """Artifact id, format and backend settings for ``screen`` from --artifact, --format, --backend, --device
    and --threads. ``get_bundle`` gives the (verified) bundle, needed only when a device profile picks."""
    from ..runtime.backends import FORMATS_BY_BACKEND, BackendSettings

    fmt = args.format
    if args.backend:
        if fmt and FORMATS_BY_BACKEND[args.backend] != fmt:
            raise UsageError(f"--backend {args.backend} runs {FORMATS_BY_BACKEND[args.backend]} files, "
                             f"not --format {fmt}")
        fmt = FORMATS_BY_BACKEND[args.backend]
    artifact, settings = args.artifact, None
    device = args.device
    if device is None and getattr(args, "device_config", None):  # the [device] profile of --device-config
        from ..devices.config import profile_from_device_config

        device = profile_from_device_config(args.device_config)
    if device:  # the device profile picks the artifact (unless given) and the backend settings
        from ..devices import resolve_device
        from ..devices.profile import choose_artifact, runnable_formats

        profile = resolve_device(device)
        bundle = get_bundle()
        if not (artifact or fmt or args.precision):
            artifact = choose_artifact(profile, bundle.artifacts, bundle.manifest, runnable_formats()).artifact_id
        settings = profile.backend_settings(threads=args.threads)
    if settings is None:
        settings = BackendSettings(threads=1 if args.threads is None else args.threads)
    return artifact, fmt, settings


def use_pipeline(choice: str, n_images: int, cores: int | None = None) -> bool:
    """Whether ``screen`` overlaps decoding of the next image with inference of this one (``--pipeline``).

    ``auto``: only for more than one image on a machine with at least two cores (with one core the two stages
    just take turns)."""
    if choice in ("on", "off"):
        return choice == "on"
    import os

    return n_images > 1 and (cores if cores is not None else (os.cpu_count() or 1)) >= 2


def pipeline_settings(settings: Any, pipeline: bool) -> Any:
    """Backend settings for a pipelined batch: onnxruntime's idle intra-op threads stop spinning when inference
    runs on more than one thread, so that they leave a core to the decoding worker (measured on 2 cores,
    ResNet-18 int8, 2 threads: pipelined 0.94x serial with spinning, 1.17x without; README, Speed)."""
    if pipeline and settings.threads != 1 and settings.allow_spinning is None:
        import dataclasses

        return dataclasses.replace(settings, allow_spinning=False)
    return settings


def cmd_screen(args: argparse.Namespace) -> int:
    from ..runtime import expand_inputs, load
    from .field import screen_field, wants_field

    if wants_field(args):  # result store, watch mode, patient fields, trust policy: cli_field.py
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
                    settings=pipeline_settings(settings, pipeline))
    with screener:
        results = list(screener.screen_many(sources, pipeline=pipeline))
    n_err = sum(1 for r in results if not r)
    summary = {"n": len(results), "refer": sum(r.decision == "refer" for r in results),
               "no_refer": sum(r.decision == "no-refer" for r in results),
               "ungradable": sum(r.decision == "ungradable" for r in results), "errors": n_err}
    payload = {"bundle_id": screener.bundle.bundle_id, "artifact": screener.artifact.id,
               "backend": screener.backend.name, "results": [r.to_dict() for r in results], "summary": summary}
    lines = [f"bundle {screener.bundle.bundle_id}, artifact {screener.artifact.id} ({screener.backend.name})"]
    lines += [_format_result(r) for r in results]
    lines.append(f"{summary['n']} images: {summary['refer']} refer, {summary['no_refer']} no-refer, "
                 f"{summary['ungradable']} ungradable (retake), {n_err} could not be screened")
    _emit(args, payload, "\n".join(lines))
    return ImageError.exit_code if n_err else 0


# ----------------------------------------------------------------------------------------------- build
def _build_config(args: argparse.Namespace) -> Any:
    from ..gate.gate import GateCriteria
    from ..pipeline.build import BuildConfig
    from ..quantization.fallback import FallbackBudget
    from ..runtime.quality import load_quality_spec
    from .field import passphrase_from_env

    criteria = GateCriteria(min_delta_auc=args.min_delta_auc, min_delta_sensitivity=args.min_delta_sensitivity,
                            max_flip_rate=args.max_flip_rate, operating_point=args.operating_point,
                            n_boot=args.n_boot, noninferiority_margin=args.noninferiority_margin,
                            min_int8_mac_fraction=args.min_int8_macs)
    return BuildConfig(
        model=args.model, out=args.out, calib=args.calib, val=args.val, val_images=args.val_images,
        arch=args.arch, num_classes=args.num_classes, name=args.name, referable_from=args.referable_from,
        calib_size=args.calib_size, exporter=args.exporter, export_atol=args.export_atol,
        parity_images=[Path(p) for p in args.parity_images], criteria=criteria,
        allow_failed_gate=args.allow_failed_gate, force=args.force, threads=args.threads,
        precisions=tuple(args.precisions.split(",")), calibrator=args.calibrator,
        exclude_nodes=list(args.exclude_nodes), fallback=not args.no_fallback,
        fallback_budget=FallbackBudget(max_trials=args.fallback_max_trials, max_seconds=args.fallback_max_seconds),
        debug_layers=not args.no_debug_layers, device=args.device,
        formats=tuple(f for f in args.formats.split(",") if f), tflite_layout=args.tflite_layout,
        tflite_int8_io=args.tflite_int8_io,
        quality=load_quality_spec(args.quality_spec) if args.quality_spec else None,
        sign_key=getattr(args, "sign_key", None),
        sign_key_passphrase=passphrase_from_env(getattr(args, "sign_key_passphrase_env", None)),
    )


def _build_summary(result: Any) -> str:
    rep = result.report
    ref = rep["reference"]
    lines = [f"reference {rep['operating_point']['locked_on']}: AUC {ref['auc']:.4f}"
             f" (95% CI {ref['auc_ci'][0]:.3f}-{ref['auc_ci'][1]:.3f}), "
             f"sensitivity {ref['sensitivity']:.4f}, specificity {ref['specificity']:.4f} at threshold "
             f"{rep['operating_point']['threshold']:.4f}"]
    for g in rep["gates"]:
        lines.append(f"{g['artifact']}: AUC {g['auc']:.4f} (Δ {g['delta_auc']:+.4f}), sensitivity "
                     f"{g['sensitivity']:.4f} (Δ {g['delta_sensitivity']:+.4f}), specificity {g['specificity']:.4f},"
                     f" flips {g['flips']}/{ref['n']} -> {'PASS' if g['passed'] else 'FAIL'}")
    lines += fallback_lines(rep)
    lines.append(f"clinical gate: {'PASSED' if rep['gate_passed'] else 'FAILED'}; bundle: {result.out}")
    return "\n".join(lines)


def fallback_lines(report: dict[str, Any]) -> list[str]:
    """One line per int8 artifact whose plain quantization failed the gate: what the fallback kept in float."""
    lines = []
    for q_id, q in (report.get("quantization") or {}).items():
        fb = q.get("fallback")
        if not fb or len(fb["steps"]) < 2:
            continue
        first = fb["steps"][0]
        kept = ", ".join(f"{k['where'] or k['node']} ({k['op_type']})" for k in fb.get("kept_in_float_detail", []))
        lines.append(f"{q_id}: plain int8 FAILED ({'; '.join(first['failures'])}); the accuracy-aware fallback "
                     f"{'passed' if fb['passed'] else 'found nothing that passes'} after {len(fb['steps']) - 1} "
                     f"candidate(s), keeping {len(fb['excluded_nodes'])} layer(s) in float: {kept or 'none'}; "
                     f"{fb['int8_mac_fraction']:.1%} of MACs int8"
                     + (" (MOSTLY FP32)" if fb.get("mostly_float") else ""))
    return lines


def cmd_build(args: argparse.Namespace) -> int:
    from ..pipeline.build import run_build

    result = run_build(_build_config(args))
    payload = {"bundle": str(result.out), "bundle_id": result.manifest["bundle_id"] if result.manifest else None,
               "gate_passed": result.gate_passed, "signed_by": result.signed_by,
               "reference": result.report["reference"],
               "gates": result.report["gates"], "operating_point": result.report["operating_point"]}
    _emit(args, payload, _build_summary(result))
    return 0


# ----------------------------------------------------------------------------------------------- check
def cmd_check(args: argparse.Namespace) -> int:
    from ..pipeline.check import run_check
    from .check_format import format_check

    result = run_check(args.bundle, args.val, args.val_images, settings=_settings(args),
                       referable_from=args.referable_from, artifacts=args.artifacts)
    _emit(args, result.to_dict(), format_check(result))
    return 0 if result.passed else 8


# ----------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    from ..bundle.read import load_bundle

    b = load_bundle(args.bundle)
    m = b.manifest
    lines = [f"bundle {b.bundle_id} (schema {m['schema_version']}), created {m.get('created')}, all "
             f"{len(m['files'])} files verified",
             f"model: {m['model'].get('arch')} classes {b.class_names}, referable {b.positive_classes}",
             f"input: {m['input']['shape']} {m['input']['layout']}; preprocessing size {b.preprocessing.size}",
             f"operating point: threshold {b.operating_point.threshold:.4f} ({b.operating_point.rule})",
             f"gate: {'passed' if m['gate']['passed'] else 'FAILED'}"
             + (" (built with --allow-failed-gate)" if m["gate"].get("allow_failed_gate") else "")]
    for a in b.artifacts:
        mark = " (default)" if a.id == m.get("default_artifact") else ""
        lines.append(f"  {a.id:<11} {a.path:<18} {a.format}/{a.precision} {a.layout} {a.io_dtype} I/O{mark}")
    _emit(args, {"bundle_id": b.bundle_id, "manifest": m, "verified": True}, "\n".join(lines))
    return 0


# ----------------------------------------------------------------------------------------------- synth
def cmd_synth(args: argparse.Namespace) -> int:
    from ..datasets.synthetic import CAMERAS, write_dataset

    for c in args.cameras:
        if c not in CAMERAS:
            raise UsageError(f"unknown camera {c!r}; known: {sorted(CAMERAS)}")
    csv_path = write_dataset(args.out, args.n, args.seed, args.size, tuple(args.cameras))
    _emit(args, {"labels": str(csv_path), "n": args.n}, f"wrote {args.n} synthetic images and {csv_path} "
          "(synthetic data: for testing the pipeline, not for clinical claims)")
    return 0


# ----------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from ..pipeline.demo import run_demo

    return run_demo(args.out, samples=args.samples, json_out=args.json, force=True, fragile=not args.skip_fragile)


def _add_gate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("clinical gate")
    g.add_argument("--min-delta-auc", type=float, default=-0.005)
    g.add_argument("--min-delta-sensitivity", type=float, default=-0.01)
    g.add_argument("--max-flip-rate", type=float, default=0.01)
    g.add_argument("--operating-point", default="sensitivity>=0.90",
                   help="'sensitivity>=X' (default 0.90) or 'youden'; locked on the first format's fp32 file")
    g.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for AUC CIs")
    g.add_argument("--noninferiority-margin", type=float, default=None,
                   help="require the paired-bootstrap 95%% CI lower bound of Δsensitivity above this (e.g. -0.02)")
    g.add_argument("--min-int8-macs", type=float, default=0.5, metavar="FRACTION",
                   help="an int8 file with a smaller share of its MACs in int8 fails (default 0.5: the accuracy-aware "
                        "fallback may not turn it into an fp32 model); 0 accepts any (still flagged in the report)")
    g.add_argument("--allow-failed-gate", action="store_true",
                   help="write the bundle even if the gate fails (the manifest records the failure)")


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fundus-edge", description="Fundus screening models on offline edge devices.")
    p.add_argument("--version", action="version", version=f"fundus-edge {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

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
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_screen)

    b = sub.add_parser("build", help="export, quantize, gate and bundle a model (needs the [export] extra)")
    b.add_argument("--model", required=True,
                   help="checkpoint/state_dict (.pt/.pth), TorchScript, torch.export (.pt2), or reference:NAME")
    b.add_argument("--arch", help="architecture for a state_dict: torchvision:NAME or fundus-edge:NAME")
    b.add_argument("--num-classes", type=int)
    b.add_argument("--calib", type=Path, required=True, help="folder of fundus images for int8 calibration")
    b.add_argument("--val", type=Path, required=True, help="labels CSV (APTOS, EyePACS, IDRiD or path,label)")
    b.add_argument("--val-images", type=Path, help="image folder for --val (default: next to the CSV)")
    b.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    b.add_argument("--name", help="bundle name (default: the model file's stem)")
    b.add_argument("--referable-from", type=int, default=2, help="grades >= this are referable (default 2)")
    b.add_argument("--calib-size", type=int, default=128)
    b.add_argument("--precisions", default="fp32,int8")
    b.add_argument("--calibrator", choices=["minmax", "entropy", "percentile"], default="minmax")
    b.add_argument("--exclude-nodes", nargs="*", default=[], help="ONNX node names to keep in float from the start")
    b.add_argument("--no-fallback", action="store_true",
                   help="do not keep sensitive layers in float when plain int8 fails the gate")
    b.add_argument("--fallback-max-trials", type=int, default=24)
    b.add_argument("--fallback-max-seconds", type=float, default=900.0)
    b.add_argument("--no-debug-layers", action="store_true", help="skip the per-layer fp32-vs-int8 error table")
    b.add_argument("--formats", default="onnx,tflite",
                   help="artifact formats, comma-separated (default onnx,tflite); the first one's fp32 file locks "
                        "the operating point and its int8 file is the default artifact")
    b.add_argument("--tflite-layout", choices=["NHWC", "NCHW"], default="NHWC",
                   help="input layout of the .tflite files (default NHWC: no transpose on the device)")
    b.add_argument("--tflite-int8-io", choices=["int8", "float32"], default="int8",
                   help="I/O tensors of the int8 .tflite (default int8: full-integer, as NPUs/Edge TPUs need)")
    b.add_argument("--exporter", choices=["dynamo", "legacy"], default="dynamo")
    b.add_argument("--export-atol", type=float, default=1e-3)
    b.add_argument("--parity-images", nargs="*", default=[], help="extra images for the export parity check")
    b.add_argument("--quality-spec", type=Path,
                   help="image-quality spec JSON for the manifest (from 'quality calibrate --out'; default: built-in)")
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--device", help="target device profile: its preferred artifact becomes the bundle default and "
                   "its settings are recorded in the manifest (see 'fundus-edge devices')")
    b.add_argument("--force", action="store_true", help="replace an existing --out directory")
    b.add_argument("--json", action="store_true")
    _add_gate_args(b)
    b.set_defaults(func=cmd_build)

    c = sub.add_parser("check", help="re-run the clinical gate of a bundle on any labelled set (torch-free)")
    c.add_argument("--bundle", required=True, type=Path)
    c.add_argument("--val", required=True, type=Path)
    c.add_argument("--val-images", type=Path)
    c.add_argument("--referable-from", type=int, default=2)
    c.add_argument("--artifacts", nargs="*", help="artifact ids to check (default: all)")
    c.add_argument("--threads", type=int, default=0)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_check)

    i = sub.add_parser("info", help="verify a bundle and print its manifest summary")
    i.add_argument("--bundle", required=True, type=Path)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    y = sub.add_parser("synth", help="write a synthetic fundus data set (for testing pipelines only)")
    y.add_argument("--out", required=True, type=Path)
    y.add_argument("--n", type=int, default=100)
    y.add_argument("--seed", type=int, default=0)
    y.add_argument("--size", type=int, default=384)
    y.add_argument("--cameras", nargs="+", default=["desktop", "handheld", "darkred"])
    y.add_argument("--json", action="store_true")
    y.set_defaults(func=cmd_synth)

    d = sub.add_parser("demo", help="the whole job on the built-in reference model and synthetic data")
    d.add_argument("--out", type=Path, default=Path("demo-out"))
    d.add_argument("--samples", type=Path, default=SAMPLES, help="real photographs to screen at the end")
    d.add_argument("--json", action="store_true")
    d.add_argument("--skip-fragile", action="store_true",
                   help="skip the second part: the PTQ-fragile MobileNetV3 reference and the accuracy-aware fallback")
    d.set_defaults(func=cmd_demo)

    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name, __package__).register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except FundusEdgeError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"error": {"code": exc.code, "message": str(exc), "exit_code": exc.exit_code}}))
        print(f"fundus-edge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fundus-edge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
