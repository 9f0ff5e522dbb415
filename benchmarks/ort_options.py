"""onnxruntime session options, measured not guessed: cold start, warm latency and peak RSS per option.

    .venv/bin/python benchmarks/ort_options.py [--bundle demo-out/bundle] [--artifacts onnx-fp32 onnx-int8]
                                               [--rounds 5] [--runs 60] [--json out.json]

Every configuration runs in a fresh child process (so its peak RSS, VmHWM from /proc/self/status, is its own):
import onnxruntime, create the session (cold start = session creation time), then ``--runs`` warm inferences on
a real preprocessed image (p50). The configurations, each one change from the runtime's defaults:

  default        the runtime's settings (OnnxRuntimeBackend): level all, arena on, pattern on, 1 thread
  arena-off      enable_cpu_mem_arena = False
  pattern-off    enable_mem_pattern = False
  level-basic    graph_optimization_level = ORT_ENABLE_BASIC
  level-extended graph_optimization_level = ORT_ENABLE_EXTENDED
  threads-2      intra_op_num_threads = 2
  threads-2-nospin  intra_op_num_threads = 2 and session.intra_op.allow_spinning = 0
  ort-format     the model saved once as an ORT-format file (optimized, level all) and loaded from that

Rounds are interleaved (every configuration once per round, the order rotating), and the summary gives medians
over rounds and each configuration's ratio to ``default`` measured in the same rounds. A difference is called
beyond noise only when every round agrees on its sign and the median ratio differs from 1 by more than 5 %.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "arena-off": {"arena": False},
    "pattern-off": {"pattern": False},
    "level-basic": {"level": "ORT_ENABLE_BASIC"},
    "level-extended": {"level": "ORT_ENABLE_EXTENDED"},
    "threads-2": {"threads": 2},
    "threads-2-nospin": {"threads": 2, "spin": False},
    "ort-format": {"ort_format": True},
}

CHILD = r"""
import json, sys, time
cfg = json.loads(sys.argv[1])
import numpy as np
import onnxruntime as ort
x = np.load(cfg["input"])
opts = ort.SessionOptions()
opts.intra_op_num_threads = cfg.get("threads", 1)
opts.inter_op_num_threads = 1
opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, cfg.get("level", "ORT_ENABLE_ALL"))
opts.enable_cpu_mem_arena = cfg.get("arena", True)
opts.enable_mem_pattern = cfg.get("pattern", True)
if not cfg.get("spin", True):
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
opts.log_severity_level = 3
t0 = time.perf_counter()
sess = ort.InferenceSession(cfg["model"], sess_options=opts, providers=["CPUExecutionProvider"])
cold = time.perf_counter() - t0
name = sess.get_inputs()[0].name
first = sess.run(None, {name: x})[0]
times = []
for _ in range(cfg["runs"]):
    t = time.perf_counter()
    out = sess.run(None, {name: x})[0]
    times.append(time.perf_counter() - t)
times.sort()
rss = None
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        rss = int(line.split()[1]) / 1024.0
print(json.dumps({"cold_s": cold, "p50_ms": 1e3 * times[len(times) // 2], "rss_mb": rss,
                  "out": [float(v) for v in np.asarray(out).ravel()]}))
"""


def save_ort_format(model: Path, dest: Path) -> Path:
    """The model optimized (level all) and saved in ORT format, as onnxruntime's convert tool does."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(dest)
    opts.add_session_config_entry("session.save_model_format", "ORT")
    ort.InferenceSession(str(model), sess_options=opts, providers=["CPUExecutionProvider"])
    return dest


def child(model: Path, inp: Path, cfg: dict[str, Any], runs: int) -> dict[str, Any]:
    spec = {**cfg, "model": str(model), "input": str(inp), "runs": runs}
    r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(r.stderr[-800:])
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def preprocessed_input(bundle: Path, folder: Path) -> Path:
    import numpy as np

    from fundus_edge.bundle.read import load_bundle
    from fundus_edge.datasets.synthetic import camera_photo
    from fundus_edge.runtime.preprocess import preprocess

    b = load_bundle(bundle)
    x = preprocess(camera_photo(42, (4000, 3000)), b.preprocessing).tensor
    p = folder / "input.npy"
    np.save(p, x)
    return p


def run(bundle: Path, artifact: str, rounds: int, runs: int, folder: Path) -> dict[str, Any]:
    from fundus_edge.bundle.read import load_bundle

    b = load_bundle(bundle)
    model = b.path(b.artifact(artifact))
    ort_model = save_ort_format(model, folder / f"{artifact}.ort")
    inp = preprocessed_input(bundle, folder)
    names = list(CONFIGS)
    per: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    loads: list[float] = []
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            cfg = dict(CONFIGS[n])
            path = ort_model if cfg.pop("ort_format", False) else model
            per[n].append(child(path, inp, cfg, runs))
        loads.append(os.getloadavg()[0])
    ref = per["default"]
    summary: dict[str, Any] = {}
    for n in names:
        rows = per[n]
        s: dict[str, Any] = {k: statistics.median(x[k] for x in rows) for k in ("cold_s", "p50_ms", "rss_mb")}
        for k in ("cold_s", "p50_ms", "rss_mb"):
            ratios = [x[k] / d[k] for x, d in zip(rows, ref, strict=True)]
            med = statistics.median(ratios)
            consistent = all(q < 1 for q in ratios) or all(q > 1 for q in ratios)
            s[f"{k}_ratio"] = med
            s[f"{k}_beyond_noise"] = n != "default" and consistent and abs(med - 1) > 0.05
        s["max_abs_output_diff"] = max(abs(a - b) for x, d in zip(rows, ref, strict=True)
                                       for a, b in zip(x["out"], d["out"], strict=True))
        summary[n] = s
    return {"artifact": artifact, "rounds": rounds, "runs": runs, "load_avg_per_round": loads, "configs": summary}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=REPO / "demo-out" / "bundle")
    ap.add_argument("--artifacts", nargs="+", default=["onnx-fp32", "onnx-int8"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    import onnxruntime

    results: dict[str, Any] = {"machine": os.uname().machine, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                               "onnxruntime": onnxruntime.__version__, "bundle": str(a.bundle), "artifacts": []}
    with tempfile.TemporaryDirectory(prefix="fe-ortopt-") as tmp:
        for artifact in a.artifacts:
            print(f"== {artifact}: {a.rounds} interleaved rounds x {len(CONFIGS)} configurations, {a.runs} warm runs "
                  "each", flush=True)
            res = run(a.bundle, artifact, a.rounds, a.runs, Path(tmp))
            results["artifacts"].append(res)
            print(f"{'config':<17} {'cold ms':>8} {'x def':>6} {'p50 ms':>7} {'x def':>6} {'RSS MB':>7} {'x def':>6}  "
                  "(* beyond noise)")
            for n, s in res["configs"].items():
                def cell(k: str, scale: float, fmt: str, s: dict[str, Any] = s) -> str:
                    star = "*" if s[f"{k}_beyond_noise"] else " "
                    return f"{s[k] * scale:{fmt}} {s[f'{k}_ratio']:5.2f}{star}"

                print(f"{n:<17} {cell('cold_s', 1e3, '8.1f')} {cell('p50_ms', 1, '7.2f')} {cell('rss_mb', 1, '7.1f')}"
                      f"  max |out - default| {s['max_abs_output_diff']:.1e}")
            print("load average (1 min) after each round: "
                  + " ".join(f"{x:.2f}" for x in res["load_avg_per_round"]), flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
