"""``make demo`` / ``fundus-edge demo``: the whole job on the built-in default.

Part 1 (real photographs): the real reference DR model (trained on IDRiD train only) -> ONNX + TFLite -> int8
calibrated on real fundus photos -> clinical gate on IDRiD test + HRF -> bundle -> screening of the HRF photos with
the torch-free runtime, with agreement against HRF's own diagnoses. Part 2 (synthetic images, pipeline testing only):
the PTQ-fragile reference models and the accuracy-aware fallback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..datasets.synthetic import write_dataset
from ..pipeline.build import BuildConfig, run_build
from ..runtime import load
from .build import build_summary
from .demo_real import REAL_MODEL, RealData, agreement_lines, build_real, hrf_agreement, prepare_real_data
from .output import screening_line


def run_demo(out: Path, data_root: Path | None = None, json_out: bool = False, force: bool = True,
             n_val: int = 300, n_calib: int = 64, fragile: bool = True) -> int:
    """Part 1, real: the real reference DR model gated on real photographs and screening real HRF eyes.
    Part 2, synthetic: the PTQ-fragile reference models and the accuracy-aware fallback (pipeline testing only)."""
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_real_data(out, data_root)
    result = build_real(out, data, force, log)
    inputs = [str(p.path) for p in data.hrf] + _bad_inputs(out, data)
    log(f"== screen: {len(inputs)} images with the runtime (no torch): the {len(data.hrf)} HRF photographs, a broken "
        "file and an out-of-focus copy")
    with load(out / "bundle") as screener:
        results = list(screener.screen_many(inputs))
    table = hrf_agreement(results, data.hrf)
    tflite: dict[str, Any] = {}
    if any(a.id == "tflite-int8" for a in screener.bundle.artifacts):
        log("== screen again with the int8 TFLite artifact (LiteRT, as on a Raspberry Pi or an Android screener)")
        with load(screener.bundle, artifact="tflite-int8") as lite:
            lite_results = list(lite.screen_many(inputs))
            tflite = {"artifact": lite.artifact.id, "backend": lite.backend.name, "results": lite_results,
                      "hrf_agreement": hrf_agreement(lite_results, data.hrf)}
    from .demo_seg import segmentation_demo

    log("== part 3 (real): the vessel-segmentation reference model, gated on expert masks, overlays for HRF photos")
    vessels = segmentation_demo(out, log)
    fragile_reps = _synthetic_part(out, n_val, n_calib, force) if fragile else []
    if json_out:
        print(json.dumps({"bundle": str(out / "bundle"), "bundle_id": screener.bundle.bundle_id,
                          "validation": data.description(), "gate_passed": result.gate_passed,
                          "verdict": result.report["verdict"],
                          "reference": result.report["reference"], "gates": result.report["gates"],
                          "results": [r.to_dict() for r in results], "hrf_agreement": table,
                          "vessels": vessels,
                          **({"tflite": {**tflite, "results": [r.to_dict() for r in tflite["results"]]}}
                             if tflite else {}),
                          **({"fragile_models": fragile_reps} if fragile_reps else {})}, indent=2))
    else:
        _print_text(out, data, result, screener, results, table, tflite, fragile_reps)
        print("\n".join(vessel_lines(vessels)))
    # the real bundle must not FAIL (INSUFFICIENT EVIDENCE is allowed and reported: n=148 cannot show the default
    # margins); the synthetic PTQ-fragile part shows what the gate says, whichever verdict that is
    return 0 if result.report["verdict"] != "FAIL" and vessels["gate_passed"] else 8


def vessel_lines(v: dict[str, Any]) -> list[str]:
    ref = v["reference"]
    nan = float("nan")
    lines = [f"\nPART 3 (real): vessel segmentation, gated on {len(v['validation_photos'])} expert-labelled "
             f"test photos (HRF, CHASE_DB1): fp32 pixel AUC {ref.get('auc', nan):.4f}, F1 {ref.get('f1', nan):.4f} "
             "(reference model below its 0.97 AUC target; see models/cards/vessels-unet.md)"]
    for g in v["gates"]:
        lines.append(f"  {g['artifact']:<26} ΔAUC {g['delta_auc']:+.4f}, ΔF1 {g['delta_f1']:+.4f}, min "
                     f"fp32-vs-int8 mask Dice {g['min_mask_dice']:.4f} -> {'PASS' if g['passed'] else 'FAIL'}"
                     + ("  (shipped)" if g.get("ships") else ""))
    for o in v.get("overlays", []):
        b = o["biomarkers"]
        lines.append(f"  {Path(o['photo']).name} ({o['diagnosis']}): vessel density {b['density']:.3f}, fractal "
                     f"dimension {b['fractal_dimension']:.3f}; overlay {o['overlay']}")
    return lines


def log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def _bad_inputs(out: Path, data: RealData) -> list[str]:
    """A file that is not an image, and an out-of-focus copy of a real photograph (the quality gate's case)."""
    from PIL import Image, ImageFilter

    broken = out / "data" / "not-a-photo.jpg"
    broken.write_bytes(b"this is not a JPEG")
    with Image.open(data.hrf[0].path) as img:
        blurred = img.convert("RGB").filter(ImageFilter.GaussianBlur(0.012 * min(img.size)))
    blurred.save(out / "data" / "out-of-focus-copy.jpg", quality=92)
    return [str(broken), str(out / "data" / "out-of-focus-copy.jpg")]


def _synthetic_part(out: Path, n_val: int, n_calib: int, force: bool) -> list[dict[str, Any]]:
    cameras = ("desktop", "handheld", "darkred")
    log(f"== SYNTHETIC data for part 2: {n_calib} calibration + {n_val} validation + {n_val} held-out images "
        "(pipeline testing only, no clinical meaning)")
    calib_csv = write_dataset(out / "data" / "synthetic-calib", n_calib, seed=11, cameras=cameras)
    val_csv = write_dataset(out / "data" / "synthetic-val", n_val, seed=12, cameras=cameras)
    held_csv = write_dataset(out / "data" / "synthetic-heldout", n_val, seed=13, cameras=cameras)
    return [_fragile_model(out, name, formats, note, calib_csv.parent, val_csv, held_csv, force, log)
            for name, formats, note in FRAGILE]


def _print_text(out: Path, data: RealData, result: Any, screener: Any, results: list[Any],
                table: dict[str, dict[str, int]], tflite: dict[str, Any], fragile_reps: list[dict[str, Any]]) -> None:
    print(f"PART 1 (real): {REAL_MODEL} gated on {data.description()}")
    print(build_summary(result))
    print(f"What n={data.n_idrid + data.n_hrf} can show: an int8-vs-fp32 difference of a few decisions and ΔAUC "
          "beyond ~±0.01; it cannot show Δsensitivity >= -1 pp (one referable eye is ~1.2 pp here).")
    print(f"report: {out / 'bundle' / 'report.md'}")
    print(f"screening with {screener.artifact.id} ({screener.backend.name}):")
    for r in results:
        print("  " + screening_line(r))
    print("\n".join(agreement_lines(table, screener.artifact.id)))
    if tflite:
        print("\n".join(agreement_lines(tflite["hrf_agreement"], tflite["artifact"])))
    if fragile_reps:
        print("\nPART 2 (SYNTHETIC images, pipeline testing only): PTQ-fragile reference models")
    for rep in fragile_reps:
        print("\n".join(rep["summary"]))


# (reference model, formats, what it shows). The MobileNetV3 is built for ONNX only: its TFLite fallback did not
# find a passing file within the default budget when measured, and the demo's time is better spent elsewhere.
FRAGILE = (
    ("dr-vit-tiny", ("onnx", "tflite"),
     "a small ViT: plain int8 collapses (LayerNorm inputs, attention); the fallback keeps a few tensors float"),
    ("dr-mobilenetv3s", ("onnx",),
     "MobileNetV3-small: its int8 error is spread over the whole network; the fallback has to search"),
)


def _fragile_model(out: Path, name: str, formats: tuple[str, ...], note: str, calib: Path, val_csv: Path,
                   held_csv: Path, force: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """A PTQ-fragile reference through the same gate with the accuracy-aware fallback: the search picks on one half
    of the validation set and the other half certifies; the pick is also re-checked on held-out images."""
    from ..errors import GateFailedError
    from ..pipeline.check import run_check
    from .check_format import format_check

    log(f"== build: reference:{name} ({', '.join(formats)}) -> the same gate, accuracy-aware fallback on")
    summary = ["", f"PTQ-fragile reference model {name} (SYNTHETIC images): {note}"]
    bundle = out / f"bundle-{name}"
    try:
        result = run_build(BuildConfig(model=f"reference:{name}", out=bundle, calib=calib, val=val_csv, name=name,
                                       force=force, formats=formats, val_synthetic=True,
                                       val_description="synthetic images (pipeline testing only)",
                                       allow_insufficient_evidence=True), log=log)
    except GateFailedError as exc:
        summary.append(f"  clinical gate: {exc}")
        return {"model": name, "gate_passed": False, "verdict": "FAIL", "error": str(exc), "summary": summary}
    summary += ["  " + line for line in build_summary(result).splitlines()]
    log(f"== held-out re-check of {name}: {held_csv.parent} (new synthetic images, seed 13)")
    check = run_check(bundle, held_csv)
    summary.append("  held-out re-check (images neither the search nor the certification saw):")
    summary += ["    " + line for line in format_check(check).splitlines()]
    return {"model": name, "gate_passed": result.gate_passed, "bundle": str(bundle),
            "verdict": result.report["verdict"], "images": result.report["images"],
            "gates": result.report["gates"], "heldout_passed": check.passed, "heldout_verdict": check.verdict,
            "heldout_drift": [d.to_dict() for d in check.drift],
            "fallback": {k: v.get("fallback") for k, v in result.report["quantization"].items()},
            "summary": summary}
