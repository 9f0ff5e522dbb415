"""The TFLite path, measured side by side with ONNX in one run on this machine.

1. Build time: the reference model built with ``--formats onnx`` and with ``--formats onnx,tflite``.
2. Agreement with PyTorch on the validation images: max/mean |logit difference|, top-1 and decision agreement
   (at the bundle's operating point) of every artifact, through the runtime backends.
3. Latency per image (batch 1, inference only, medians of interleaved rounds) and the ratio to ONNX fp32.

Usage: python -m fundus_edge.benchmarks.tflite_path --out /tmp/bench [--threads 1] [--rounds 50]
(synthetic data: it measures the pipeline, not clinical accuracy). The gate is allowed to fail here so that
timings are always printed; gate results are printed too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fundus_edge.bundle.read import load_bundle
from fundus_edge.datasets.synthetic import write_dataset
from fundus_edge.export.load import load_model
from fundus_edge.export.validate import torch_outputs
from fundus_edge.pipeline.build import BuildConfig, run_build
from fundus_edge.quantization.calibration import prepare_inputs
from fundus_edge.runtime.backends import BackendSettings, create_backend, run_backend
from fundus_edge.runtime.compare import Tolerance, compare_outputs
from fundus_edge.runtime.preprocess import relayout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=1, help="inference threads for the latency rounds")
    ap.add_argument("--rounds", type=int, default=50)
    args = ap.parse_args()
    cams = ("desktop", "handheld", "darkred")
    calib = write_dataset(args.out / "calib", 64, seed=11, cameras=cams).parent
    val = write_dataset(args.out / "val", 300, seed=12, cameras=cams)

    seconds = {}
    for formats in (("onnx",), ("onnx", "tflite")):
        name = "+".join(formats)
        t0 = time.perf_counter()
        res = run_build(BuildConfig(model="reference:dr-resnet18s", out=args.out / name, calib=calib, val=val,
                                    formats=formats, allow_failed_gate=True, force=True), log=lambda s: None)
        seconds[name] = time.perf_counter() - t0
        gates = ", ".join(f"{g['artifact']} {'PASS' if g['passed'] else 'FAIL'} (flips {g['flips']})"
                          for g in res.report["gates"])
        print(f"build --formats {','.join(formats):<12} {seconds[name]:6.1f} s   gate: {gates}")
    print(f"TFLite adds {seconds['onnx+tflite'] - seconds['onnx']:.1f} s "
          f"({seconds['onnx+tflite'] / seconds['onnx']:.2f}x the ONNX-only build)")

    bundle = load_bundle(args.out / "onnx+tflite")
    x = prepare_inputs(list(sorted((args.out / "val").glob("*.jpg"))), bundle.preprocessing).tensors
    ref = torch_outputs(load_model("reference:dr-resnet18s").module, x)
    print(f"\nagreement with PyTorch on {len(x)} validation images (decisions at threshold "
          f"{bundle.operating_point.threshold:.4f}):")
    for art in bundle.artifacts:
        out, _ = run_backend(art.format, bundle.path(art), relayout(x, bundle.preprocessing.layout, art.layout),
                             BackendSettings(threads=0))
        r = compare_outputs(ref, out, reference_name="pytorch", candidate_name=art.id, tolerance=Tolerance(atol=1e9),
                            positive_classes=bundle.positive_classes, threshold=bundle.operating_point.threshold)
        print(f"  {art.id:<12} max|d| {r.max_abs:.2e}  mean|d| {r.mean_abs:.2e}  top-1 {r.top1_agreement:.4f}  "
              f"decision {r.decision_agreement:.4f}")

    one = x[:1]
    backends = {}
    for art in bundle.artifacts:
        b = create_backend(art.format, bundle.path(art), BackendSettings(threads=args.threads))
        b.activate()
        backends[art.id] = (b, np.ascontiguousarray(relayout(one, bundle.preprocessing.layout, art.layout)))
        for _ in range(5):
            b.infer(backends[art.id][1])
        b.timings.infer_ms.clear()
    for _ in range(args.rounds):  # interleaved, so that load on the machine hits every artifact alike
        for b, inp in backends.values():
            b.infer(inp)
    med = {k: float(np.median(b.timings.infer_ms)) for k, (b, _) in backends.items()}
    print(f"\nlatency per image, {args.threads} thread(s), median of {args.rounds} interleaved rounds:")
    for k, ms in med.items():
        print(f"  {k:<12} {ms:7.2f} ms   {med['onnx-fp32'] / ms:5.2f}x onnx-fp32 speed")
    for b, _ in backends.values():
        b.deactivate()


if __name__ == "__main__":
    main()
