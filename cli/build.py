"""``fundus-edge build``: export, quantize, gate and bundle a model (a PyTorch model needs the [export] extra; a
brought fp32 .onnx file needs only [quantize], no PyTorch)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .field import passphrase_from_env
from .output import emit


def build_config(args: argparse.Namespace) -> Any:
    from ..gate.gate import GateCriteria
    from ..pipeline.build import BuildConfig
    from ..quantization.fallback import FallbackBudget
    from ..runtime.quality import load_quality_spec

    criteria = GateCriteria(min_delta_auc=args.min_delta_auc, min_delta_sensitivity=args.min_delta_sensitivity,
                            max_flip_rate=args.max_flip_rate, operating_point=args.operating_point,
                            n_boot=args.n_boot, noninferiority_margin=args.noninferiority_margin,
                            min_int8_mac_fraction=args.min_int8_macs,
                            min_delta_specificity=args.min_delta_specificity, confidence=args.confidence)
    return BuildConfig(
        model=args.model, out=args.out, task=args.task, calib=args.calib, val=args.val, val_images=args.val_images,
        val_description=args.val_description,
        val_synthetic=args.val_synthetic,
        arch=args.arch, num_classes=args.num_classes, name=args.name, referable_from=args.referable_from,
        calib_size=args.calib_size, exporter=args.exporter, export_atol=args.export_atol,
        parity_images=[Path(p) for p in args.parity_images], criteria=criteria,
        allow_failed_gate=args.allow_failed_gate, allow_insufficient_evidence=args.allow_insufficient_evidence,
        force=args.force, threads=args.threads,
        precisions=tuple(args.precisions.split(",")), calibrator=args.calibrator,
        exclude_nodes=list(args.exclude_nodes), fallback=not args.no_fallback,
        fallback_budget=FallbackBudget(max_trials=args.fallback_max_trials, max_seconds=args.fallback_max_seconds),
        debug_layers=not args.no_debug_layers, device=args.device,
        formats=formats_arg(args), tflite_layout=args.tflite_layout,
        preprocess_overrides=preprocess_overrides(args),
        tflite_int8_io=args.tflite_int8_io,
        quality=load_quality_spec(args.quality_spec) if args.quality_spec else None,
        sign_key=getattr(args, "sign_key", None),
        sign_key_passphrase=passphrase_from_env(getattr(args, "sign_key_passphrase_env", None)),
    )


def formats_arg(args: argparse.Namespace) -> tuple[str, ...]:
    """--formats, or by default a brought .onnx/.tflite file's own format, else onnx,tflite."""
    from ..pipeline.intake import default_formats

    if args.formats is None:
        return default_formats(args.model)
    return tuple(f for f in args.formats.split(",") if f)


def preprocess_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The preprocessing flags given on the command line, as PreprocessSpec fields."""
    given = {"size": args.input_size, "mean": args.mean, "std": args.std, "resample": args.resample,
             "ben_graham_sigma": args.ben_graham_sigma}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in given.items() if v is not None}


def add_preprocess_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "preprocessing",
        "For a .onnx/.tflite model these flags define the preprocessing (the file carries no checkpoint metadata; "
        "its input layout and fixed size are read from the file): field-of-view crop, resize to --input-size, "
        "scale pixels to [0, 1], then (x - mean) / std per RGB channel. Defaults: 224 (or the file's size), "
        "ImageNet mean/std. A model that takes [-1, 1] inputs needs --mean 0.5 0.5 0.5 --std 0.5 0.5 0.5; one "
        "that takes 0..255 needs --mean 0 0 0 --std 0.00392157 0.00392157 0.00392157. For a PyTorch checkpoint "
        "they override what it recorded. The bundle's manifest records the result.")
    g.add_argument("--input-size", type=int, metavar="PIXELS",
                   help="square input side (needed only for a model file with a dynamic height and width)")
    g.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"), help="per-channel mean of [0, 1] pixels")
    g.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"), help="per-channel std of [0, 1] pixels")
    g.add_argument("--resample", choices=["nearest", "bilinear", "bicubic", "lanczos"],
                   help="resize filter (default bilinear)")
    g.add_argument("--ben-graham-sigma", type=float, metavar="FRACTION",
                   help="Ben Graham local-average subtraction, Gaussian sigma as a fraction of the input size "
                        "(default: off)")


def build_summary(result: Any) -> str:
    rep = result.report
    ref = rep["reference"]
    lines = [f"reference {rep['operating_point']['locked_on']}: AUC {ref['auc']:.4f}"
             f" (95% CI {ref['auc_ci'][0]:.3f}-{ref['auc_ci'][1]:.3f}), "
             f"sensitivity {ref['sensitivity']:.4f}, specificity {ref['specificity']:.4f} at threshold "
             f"{rep['operating_point']['threshold']:.4f}"]
    for g in rep["gates"]:
        lines.append(f"{g['artifact']}: AUC {g['auc']:.4f} (Δ {g['delta_auc']:+.4f}), sensitivity "
                     f"{g['sensitivity']:.4f} (Δ {g['delta_sensitivity']:+.4f}), specificity {g['specificity']:.4f},"
                     f" flips {g['flips']}/{g['certification']['n']} -> {g['verdict']} (certified on "
                     f"{g['certification']['images']}, n {g['certification']['n']})")
        lines += [f"  not shown: {m}" for m in g["insufficient"]]
    lines += fallback_lines(rep)
    lines.append(f"clinical gate: {rep['verdict']}; bundle: {result.out}")
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


def seg_summary(result: Any) -> str:
    rep = result.report
    ref, op = rep["reference"], rep["operating_point"]
    lines = [f"reference {op['locked_on']}: pixel AUC {ref['auc']:.4f}, F1 {ref['f1']:.4f}, sensitivity "
             f"{ref['sensitivity']:.4f}, specificity {ref['specificity']:.4f} at threshold {op['threshold']:.4f} "
             f"({op['rule']})"]
    for g in rep["gates"]:
        lines.append(f"{g['artifact']}: AUC {g['auc']:.4f} (Δ {g['delta_auc']:+.4f}), F1 {g['f1']:.4f} "
                     f"(Δ {g['delta_f1']:+.4f}), min fp32-vs-int8 mask Dice {g['min_mask_dice']:.4f} -> "
                     f"{'PASS' if g['passed'] else 'FAIL'}{'' if g['ships'] else ' (measured, not shipped)'}")
    lines.append(f"segmentation gate: {'PASSED' if rep['gate_passed'] else 'FAILED'}; bundle: {result.out}")
    return "\n".join(lines)


def _device_gate_request(args: argparse.Namespace) -> Any:
    """The post-build device gate asked for with --device-gate (None when not), checked before the build."""
    if not getattr(args, "device_gate", False):
        return None
    from ..devices.emulate import want_emulation
    from ..devices.profile import get_profile
    from ..errors import UsageError
    from ..pipeline.device_gate import DeviceGateConfig

    if not args.device:
        raise UsageError("--device-gate needs --device PROFILE (e.g. rpi4)")
    if want_emulation(get_profile(args.device), "auto"):
        from ..devices.emuroot import open_root

        open_root()  # no emulation root: fail now, not after the build
    return DeviceGateConfig(args.device, args.device_images, args.device_seed)


def _run_device_gate(args: argparse.Namespace, result: Any, cfg: Any, payload: dict[str, Any],
                     text: str) -> tuple[str, int]:
    import sys

    from ..pipeline.device_gate import device_lines
    from ..pipeline.device_gate_build import device_gate_after_build
    from .choices import backend_settings

    dev = device_gate_after_build(result.out, cfg, backend_settings(args),
                                  log=lambda s: print(s, file=sys.stderr, flush=True))
    payload["device"] = dev.to_dict()
    code = {"PASS": 0, "INSUFFICIENT EVIDENCE": 0 if args.allow_insufficient_evidence else 15}.get(dev.verdict, 8)
    return "\n".join([text, *device_lines(dev)]), code


def cmd_build(args: argparse.Namespace) -> int:
    from ..pipeline.build import run_build

    device_cfg = _device_gate_request(args)
    result = run_build(build_config(args))
    if result.report.get("task") == "segmentation":
        payload = {"bundle": str(result.out), "task": "segmentation",
                   "bundle_id": result.manifest["bundle_id"] if result.manifest else None,
                   "gate_passed": result.gate_passed, "signed_by": result.signed_by,
                   "reference": result.report["reference"], "gates": result.report["gates"],
                   "operating_point": result.report["operating_point"]}
        emit(args, payload, seg_summary(result))
        return 0
    payload = {"bundle": str(result.out), "bundle_id": result.manifest["bundle_id"] if result.manifest else None,
               "gate_passed": result.gate_passed, "verdict": result.report["verdict"],
               "signed_by": result.signed_by, "images": result.report["images"],
               "reference": result.report["reference"],
               "gates": result.report["gates"], "operating_point": result.report["operating_point"]}
    text, code = build_summary(result), 0
    if device_cfg is not None:
        text, code = _run_device_gate(args, result, device_cfg, payload, text)
    emit(args, payload, text)
    return code


def add_gate_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("clinical gate")
    g.add_argument("--min-delta-auc", type=float, default=-0.005)
    g.add_argument("--min-delta-sensitivity", type=float, default=-0.01)
    g.add_argument("--max-flip-rate", type=float, default=0.01)
    g.add_argument("--min-delta-specificity", type=float, default=-0.02,
                   help="Δspecificity margin (default -0.02): below it FAILs; its lower bound above it is needed")
    g.add_argument("--confidence", type=float, default=0.95,
                   help="one-sided confidence of the bounds behind the verdict (default 0.95; see docs/gate.md)")
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
    g.add_argument("--allow-insufficient-evidence", action="store_true",
                   help="write the bundle when no harm was seen but the bounds could not show the margins "
                        "(verdict INSUFFICIENT EVIDENCE, exit 15 otherwise); the manifest records it")


def register(sub: Any) -> None:
    b = sub.add_parser("build", help="export, quantize, gate and bundle a model (a PyTorch model needs the [export] "
                       "extra; an fp32 .onnx file only [quantize], no PyTorch)")
    b.add_argument("--model", required=True,
                   help="checkpoint/state_dict (.pt/.pth), TorchScript, torch.export (.pt2), reference:NAME, or an "
                        "fp32 .onnx / .tflite file (no PyTorch needed: the file is the reference and ships "
                        "unchanged; set its preprocessing with the flags below)")
    b.add_argument("--task", choices=["classification", "segmentation", "auto"], default="auto",
                   help="classification (a referable-DR classifier, [N, C] logits), segmentation (a vessel model, "
                        "[N, C, H, W] logits; --val is then a masks CSV image,mask[,fov]) or auto (default: the "
                        "checkpoint's task, else the one its probed output fits)")
    b.add_argument("--arch", help="architecture for a state_dict: torchvision:NAME or fundus-edge:NAME")
    b.add_argument("--num-classes", type=int)
    b.add_argument("--calib", type=Path, required=True, help="folder of fundus images for int8 calibration")
    b.add_argument("--val", type=Path, required=True,
                   help="labels CSV (APTOS, EyePACS, IDRiD or path,label); segmentation: masks CSV image,mask[,fov]")
    b.add_argument("--val-images", type=Path, help="image folder for --val (default: next to the CSV)")
    b.add_argument("--val-description", metavar="TEXT",
                   help="what the validation photos are, for the report (e.g. 'IDRiD test, real photographs')")
    b.add_argument("--val-synthetic", action=argparse.BooleanOptionalAction, default=None,
                   help="say whether the validation images are synthetic (the report warns when not said)")
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
    b.add_argument("--formats", default=None,
                   help="artifact formats, comma-separated (default onnx,tflite; a .onnx/.tflite model: its own "
                        "format); the first one's fp32 file locks the operating point and its int8 file is the "
                        "default artifact")
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
    b.add_argument("--device-gate", action="store_true",
                   help="with --device: after the build, gate the int8 files on the device's own kernels (Arm: "
                        "emulated, slow) on the certification images; the verdict sets the exit code, it is not "
                        "in the signed manifest (see docs/gate.md)")
    b.add_argument("--device-images", type=int, metavar="N",
                   help="with --device-gate: a seeded stratified sample of N certification images (default: all)")
    b.add_argument("--device-seed", type=int, default=0, help="seed of the --device-images sample")
    b.add_argument("--force", action="store_true", help="replace an existing --out directory")
    b.add_argument("--json", action="store_true", help="one JSON document on stdout")
    add_preprocess_args(b)
    add_gate_args(b)
    s = b.add_argument_group("signing")
    s.add_argument("--sign-key", type=Path, metavar="KEY",
                   help="Ed25519 private key (from 'fundus-edge keys generate'): sign the bundle's manifest")
    s.add_argument("--sign-key-passphrase-env", metavar="VAR",
                   help="name of the environment variable holding the signing key's passphrase")
    b.set_defaults(func=cmd_build)
