"""Batch throughput: serial screening vs decode/preprocess of image N+1 overlapped with inference of image N.

    .venv/bin/python benchmarks/pipeline.py [--bundle demo-out/bundle] [--artifacts onnx-int8 onnx-fp32]
                                            [--threads 1 2] [--images 8] [--rounds 3] [--json out.json]

Same machine, same images (12 MP synthetic camera photos, JPEG quality 95), same loaded screener: each round
screens the whole folder serially and then pipelined (the order alternates every round), for every artifact and
inference thread count (with more than one thread: onnxruntime's default spinning and with
``allow_spinning`` off). Prints images/s (median over rounds) and the pipelined / serial ratio, and checks that
both give the same results in the same order. Load average is printed with every measurement: on a shared
machine the ratio (measured interleaved) is what to quote, not the absolute numbers.
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

REPO = Path(__file__).resolve().parent.parent


def make_images(folder: Path, n: int) -> list[str]:
    from fundus_edge.datasets.synthetic import camera_photo

    out = []
    for i in range(n):
        p = folder / f"camera_12MP_{i}.jpg"
        p.write_bytes(camera_photo(500 + i, (4000, 3000)))
        out.append(str(p))
    return out


def _strip(results: list[Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.to_dict().items() if k != "timings_ms"} for r in results]


def measure(bundle: Path, artifact: str, threads: int, images: list[str], rounds: int,
            spin: bool | None = None) -> dict[str, Any]:
    from fundus_edge.runtime import BackendSettings, load

    with load(bundle, artifact=artifact, settings=BackendSettings(threads=threads, allow_spinning=spin)) as s:
        reference = _strip(list(s.screen_many(images[:2])))  # warm-up
        ips: dict[str, list[float]] = {"serial": [], "pipelined": []}
        same = True
        for r in range(rounds):
            order = ("serial", "pipelined") if r % 2 == 0 else ("pipelined", "serial")
            for mode in order:
                t0 = time.perf_counter()
                results = list(s.screen_many(images, pipeline=mode == "pipelined"))
                ips[mode].append(len(images) / (time.perf_counter() - t0))
                if mode == "serial":
                    reference = _strip(results)
                else:
                    same = same and _strip(results) == reference
    serial, piped = statistics.median(ips["serial"]), statistics.median(ips["pipelined"])
    return {"artifact": artifact, "threads": threads, "spin": spin, "serial_ips": serial, "pipelined_ips": piped,
            "ratio": piped / serial, "runs": ips, "identical_results": same, "load_avg": os.getloadavg()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=REPO / "demo-out" / "bundle")
    ap.add_argument("--artifacts", nargs="+", default=["onnx-int8", "onnx-fp32"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    out: dict[str, Any] = {"machine": os.uname().machine, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                           "bundle": str(a.bundle), "rows": []}
    with tempfile.TemporaryDirectory(prefix="fe-pipeline-") as tmp:
        images = make_images(Path(tmp), a.images)
        print(f"{len(images)} x 12 MP JPEG, {a.rounds} rounds each, serial and pipelined alternating", flush=True)
        print(f"{'artifact':<12} {'threads':>11} {'serial img/s':>13} {'pipelined':>10} {'ratio':>6} {'same':>5}  "
              "load avg")
        for artifact in a.artifacts:
            for threads, spin in [(t, s) for t in a.threads for s in ((None,) if t == 1 else (None, False))]:
                row = measure(a.bundle, artifact, threads, images, a.rounds, spin)
                out["rows"].append(row)
                la = " ".join(f"{x:.2f}" for x in row["load_avg"])
                label = f"{threads}{' no-spin' if spin is False else ''}"
                print(f"{artifact:<12} {label:>11} {row['serial_ips']:>13.2f} {row['pipelined_ips']:>10.2f} "
                      f"{row['ratio']:>6.2f} {row['identical_results']!s:>5}  {la}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0 if all(r["identical_results"] for r in out["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
