"""Preallocated input buffer vs a new array per image: does reusing the normalisation output help?

    .venv/bin/python benchmarks/input_buffer.py [--bundle demo-out/bundle] [--sizes 224 512] [--reps 400]

Two measurements, each side by side and interleaved (A B A B ...):
  normalize   the fused normalisation alone (runtime.preprocess.normalize) of a crop, into a new array vs into
              a reused one, NCHW float32, at each size;
  screen      Screener.screen of 12 MP synthetic photos with ``reuse_buffers`` off vs on (two screeners on the
              same bundle artifact), end to end and the preprocess stage.
Prints medians and the reused / new ratio; the load average is printed with every line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def bench_normalize(size: int, reps: int) -> dict[str, Any]:
    from PIL import Image

    from fundus_edge.runtime.preprocess import PreprocessSpec, normalize

    spec = PreprocessSpec(size=size)
    rng = np.random.default_rng(0)
    crop = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = np.empty((1, 3, size, size), np.float32)
    new: list[float] = []
    reused: list[float] = []
    for i in range(reps):
        for mode in (("new", "reused") if i % 2 == 0 else ("reused", "new")):
            t0 = time.perf_counter()
            out = normalize(crop, spec, out=None if mode == "new" else buf)
            dt = (time.perf_counter() - t0) * 1e6
            (new if mode == "new" else reused).append(dt)
            del out
    if not np.array_equal(normalize(crop, spec), normalize(crop, spec, out=buf)):
        raise SystemExit("normalize into a reused buffer differs from a new array")
    n, r = statistics.median(new), statistics.median(reused)
    return {"size": size, "new_us": n, "reused_us": r, "ratio": r / n, "load_avg": os.getloadavg()}


def bench_screen(bundle: Path, artifact: str, images: list[str], rounds: int) -> dict[str, Any]:
    from fundus_edge.runtime import load

    a = load(bundle, artifact=artifact, reuse_buffers=False)
    b = load(bundle, artifact=artifact, reuse_buffers=True)
    times: dict[str, dict[str, list[float]]] = {m: {"e2e": [], "preprocess": []} for m in ("new", "reused")}
    try:
        for s in (a, b):
            s.screen(images[0])
        for r in range(rounds):
            for i, img in enumerate(images):
                pair = ((a, "new"), (b, "reused")) if (r + i) % 2 == 0 else ((b, "reused"), (a, "new"))
                for s, mode in pair:
                    t0 = time.perf_counter()
                    res = s.screen(img)
                    times[mode]["e2e"].append((time.perf_counter() - t0) * 1e3)
                    times[mode]["preprocess"].append(res.timings_ms["preprocess"])
    finally:
        a.close()
        b.close()
    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in times.items()}
    return {"artifact": artifact, "ms": med, "e2e_ratio": med["reused"]["e2e"] / med["new"]["e2e"],
            "preprocess_ratio": med["reused"]["preprocess"] / med["new"]["preprocess"], "load_avg": os.getloadavg()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=REPO / "demo-out" / "bundle")
    ap.add_argument("--artifact", default="onnx-int8")
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    ap.add_argument("--reps", type=int, default=2000)
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    from fundus_edge.datasets.synthetic import camera_photo

    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "normalize": [], "screen": None}
    for size in a.sizes:
        r = bench_normalize(size, a.reps)
        out["normalize"].append(r)
        print(f"normalize {size}x{size}: new array {r['new_us']:.1f} us, reused buffer {r['reused_us']:.1f} us, "
              f"ratio {r['ratio']:.3f}  (load avg {' '.join(f'{x:.2f}' for x in r['load_avg'])})", flush=True)
    with tempfile.TemporaryDirectory(prefix="fe-buf-") as tmp:
        images = []
        for i in range(a.images):
            p = Path(tmp) / f"camera_{i}.jpg"
            p.write_bytes(camera_photo(300 + i, (4000, 3000)))
            images.append(str(p))
        s = bench_screen(a.bundle, a.artifact, images, a.rounds)
    out["screen"] = s
    ms = s["ms"]
    print(f"screen ({a.artifact}, 12 MP): end to end new {ms['new']['e2e']:.2f} ms, "
          f"reused {ms['reused']['e2e']:.2f} ms "
          f"(ratio {s['e2e_ratio']:.3f}); preprocess stage new {ms['new']['preprocess']:.3f} ms, reused "
          f"{ms['reused']['preprocess']:.3f} ms (ratio {s['preprocess_ratio']:.3f})  "
          f"(load avg {' '.join(f'{x:.2f}' for x in s['load_avg'])})")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
