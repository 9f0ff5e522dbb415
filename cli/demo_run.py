"""``make demo`` / ``fundus-edge demo``: the whole job on the built-in default.

Shipped reference model -> ONNX -> int8 calibrated on (synthetic) fundus images -> clinical gate -> bundle
-> screening of real CC0 photographs and synthetic ones with the torch-free runtime. The synthetic data
tests the pipeline; it supports no clinical claim.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..datasets.synthetic import write_dataset
from ..pipeline.build import BuildConfig, run_build
from ..runtime import expand_inputs, load
from .build import build_summary
from .output import screening_line


def run_demo(out: Path, samples: Path | None = None, json_out: bool = False, force: bool = True,
             n_val: int = 300, n_calib: int = 64, fragile: bool = True) -> int:
    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    out.mkdir(parents=True, exist_ok=True)
    log(f"== synthetic data: {n_calib} calibration + {n_val} validation images (pipeline testing only)")
    calib_csv = write_dataset(out / "data" / "calib", n_calib, seed=11, cameras=("desktop", "handheld", "darkred"))
    val_csv = write_dataset(out / "data" / "val", n_val, seed=12, cameras=("desktop", "handheld", "darkred"))
    sample_files = expand_inputs([samples]) if samples and samples.is_dir() else []
    log("== build: reference:dr-resnet18s -> ONNX + TFLite, fp32 + int8 -> clinical gate -> bundle")
    result = run_build(BuildConfig(model="reference:dr-resnet18s", out=out / "bundle", calib=calib_csv.parent,
                                   val=val_csv, name="dr-resnet18s", parity_images=[Path(s) for s in sample_files],
                                   force=force, allow_insufficient_evidence=True), log=log)
    broken = out / "data" / "not-a-photo.jpg"
    broken.write_bytes(b"this is not a JPEG")
    synth_examples = sorted((out / "data" / "val").glob("*.jpg"))[:3]
    inputs = [*sample_files, *map(str, synth_examples), str(broken)]
    if sample_files:  # an out-of-focus copy of a real photograph: the quality gate answers 'ungradable'
        from PIL import Image, ImageFilter

        with Image.open(sample_files[0]) as img:
            blurred = img.convert("RGB").filter(ImageFilter.GaussianBlur(0.012 * min(img.size)))
        blurred.save(out / "data" / "out-of-focus-copy.jpg", quality=92)
        inputs.append(str(out / "data" / "out-of-focus-copy.jpg"))
    log(f"== screen: {len(inputs)} images with the runtime (no torch), default artifact")
    with load(out / "bundle") as screener:
        results = list(screener.screen_many(inputs))
    tflite: dict[str, Any] = {}
    if any(a.id == "tflite-int8" for a in screener.bundle.artifacts):
        log("== screen again with the int8 TFLite artifact (LiteRT, as on a Raspberry Pi or an Android screener)")
        with load(screener.bundle, artifact="tflite-int8") as lite:
            tflite = {"artifact": lite.artifact.id, "backend": lite.backend.name,
                      "results": list(lite.screen_many(inputs))}
    fragile_reps: list[dict[str, Any]] = []
    if fragile:
        held_csv = write_dataset(out / "data" / "heldout", n_val, seed=13, cameras=("desktop", "handheld", "darkred"))
        for name, formats, note in FRAGILE:
            fragile_reps.append(_fragile_model(out, name, formats, note, calib_csv.parent, val_csv, held_csv, force,
                                               log))
    if json_out:
        print(json.dumps({"bundle": str(out / "bundle"), "bundle_id": screener.bundle.bundle_id,
                          "gate_passed": result.gate_passed, "verdict": result.report["verdict"],
                          "images": result.report["images"], "reference": result.report["reference"],
                          "gates": result.report["gates"], "results": [r.to_dict() for r in results],
                          **({"tflite": {**tflite, "results": [r.to_dict() for r in tflite["results"]]}}
                             if tflite else {}),
                          **({"fragile_models": fragile_reps} if fragile_reps else {})}, indent=2))
    else:
        print(build_summary(result))
        print(f"report: {out / 'bundle' / 'report.md'}")
        print(f"screening with {screener.artifact.id} ({screener.backend.name}):")
        for r in results:
            print("  " + screening_line(r))
        if tflite:
            print(f"screening with {tflite['artifact']} ({tflite['backend']}):")
            for r in tflite["results"]:
                print("  " + screening_line(r))
        print("Note: the reference model was trained on synthetic pictures only. Its decisions on the real CC0 "
              "photographs (healthy, ungraded eyes) mean nothing clinically; they are screened to exercise decoding, "
              "field-of-view detection and the runtime on real camera output. The out-of-focus copy shows the "
              "image-quality gate: no referral decision, the failing measures, and a retake hint.")
        for rep in fragile_reps:
            print("\n".join(rep["summary"]))
    # the ViT must pass through its fallback; the MobileNetV3 part shows what happens, whichever way it goes
    # the demo's 300 synthetic validation images cannot show the default margins: it builds with
    # allow_insufficient_evidence, and fails only on a FAIL verdict (harm observed)
    fragile_ok = all(r.get("verdict", "FAIL") != "FAIL" for r in fragile_reps if r["required"])
    return 0 if result.report["verdict"] != "FAIL" and fragile_ok else 8


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
    """A PTQ-fragile reference through the same gate with the accuracy-aware fallback. The fallback picks among
    candidates on the validation set, so its pick is re-checked on held-out images it never saw."""
    from ..errors import GateFailedError
    from ..pipeline.check import run_check
    from .check_format import format_check

    required = name == "dr-vit-tiny"
    log(f"== build: reference:{name} ({', '.join(formats)}) -> the same gate, accuracy-aware fallback on")
    summary = ["", f"PTQ-fragile reference model {name}: {note}"]
    bundle = out / f"bundle-{name}"
    try:
        result = run_build(BuildConfig(model=f"reference:{name}", out=bundle, calib=calib, val=val_csv, name=name,
                                       force=force, formats=formats, allow_insufficient_evidence=True), log=log)
    except GateFailedError as exc:
        summary.append(f"  clinical gate FAILED even with the fallback (no bundle written): {exc}")
        return {"model": name, "required": required, "gate_passed": False, "error": str(exc), "summary": summary}
    summary += ["  " + line for line in build_summary(result).splitlines()]
    log(f"== held-out re-check of {name}: {held_csv.parent} (new synthetic images, seed 13)")
    check = run_check(bundle, held_csv)
    summary.append("  held-out re-check (the fallback chose its files on the validation set; these images are new):")
    summary += ["    " + line for line in format_check(check).splitlines()]
    return {"model": name, "required": required, "gate_passed": result.gate_passed, "bundle": str(bundle),
            "verdict": result.report["verdict"], "images": result.report["images"],
            "gates": result.report["gates"], "heldout_passed": check.passed, "heldout_verdict": check.verdict,
            "heldout_drift": [d.to_dict() for d in check.drift],
            "fallback": {k: v.get("fallback") for k, v in result.report["quantization"].items()},
            "summary": summary}
