"""End-to-end screening latency: naive deployments vs fundus-edge, measured side by side in one run.

    .venv/bin/python benchmarks/e2e.py [--sizes 224 512] [--rounds 5] [--threads 1] [--json out.json]

Pipelines (same machine, same images, runs interleaved A B C D A B C D ...):
  (a) naive    full Pillow decode + torchvision Resize/CenterCrop/ToTensor/Normalize + PyTorch eager fp32
  (b) ort-fp32 full Pillow decode + the same transforms in numpy + plain onnxruntime fp32
  (c) fe-fp32  fundus-edge runtime (draft decode, FOV crop, fused normalise) + onnxruntime fp32
  (d) fe-int8  fundus-edge runtime + onnxruntime int8 (QDQ u8/s8)
  (e) fe-int8-noq  the same without the image-quality gate (what the gate costs)
The model is a full-width torchvision ResNet-18 (random weights: this measures speed, not accuracy), exported
and quantized by `fundus-edge build`. Images: REAL fundus photographs from the open-fundus set (HRF originals
from `hrf/fullres/`, 3504x2336, as the camera wrote them; HRF at 1752x1168; IDRiD at 1280x850), or with
`--synthetic` synthetic photographs at camera resolutions (2.5, 12, 16 MP). An image the quality gate calls
ungradable is timed up to the gate (no inference, as on the device) and counted; the no-gate pipeline infers on
every image. Cold start (process start to first result) and peak RSS (VmHWM) are measured in fresh child
processes on the largest photograph.
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

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CAMERA_SIZES = {"2.5MP": (1920, 1280), "12MP": (4000, 3000), "16MP": (4608, 3456)}


def real_images(root: str | None) -> list[str]:
    """Full-resolution HRF originals (as the camera wrote them), then HRF and IDRiD photographs: 8 in all."""
    from fundus_edge.datasets import open_fundus

    base = open_fundus.find_root(root)
    fullres = sorted((base / "hrf" / "fullres").glob("*.jpg"))[:4]
    hrf = [p.path for p in open_fundus.hrf(base)][: 8 - len(fullres) - 2]
    idrid = [p.path for p in open_fundus.idrid(base, "test")][:2]
    return [str(p) for p in [*fullres, *hrf, *idrid]]


def make_images(folder: Path) -> list[str]:
    from fundus_edge.datasets.synthetic import camera_photo

    out = []
    for i, (name, size) in enumerate(CAMERA_SIZES.items()):
        for k in range(2):
            p = folder / f"fundus_{name}_{k}.jpg"
            p.write_bytes(camera_photo(700 + 10 * i + k, size))
            out.append(str(p))
    return out


def build_bundle(folder: Path, size: int) -> Path:
    """A ResNet-18 bundle at ``size`` (speed only: random weights, gate not meaningful, so allowed to fail)."""
    import torch
    import torchvision

    from fundus_edge.datasets.synthetic import write_dataset
    from fundus_edge.pipeline.build import BuildConfig, run_build
    from fundus_edge.runtime.preprocess import PreprocessSpec

    torch.manual_seed(0)
    weights = folder / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), weights)
    data = folder / "data"
    if not (data / "labels.csv").exists():
        write_dataset(data, 40, seed=3, size=512)
    out = folder / f"bundle{size}"
    run_build(BuildConfig(model=str(weights), arch="torchvision:resnet18", num_classes=2, out=out, calib=data,
                          val=data / "labels.csv", calib_size=32, preprocessing=PreprocessSpec(size=size),
                          formats=("onnx",), allow_failed_gate=True, fallback=False, debug_layers=False,
                          force=True),
              log=lambda s: None)
    return out


class Naive:
    """(a) What a first deployment usually looks like."""

    name = "naive"

    def __init__(self, weights: Path, size: int, threads: int) -> None:
        import torch
        import torchvision
        from torchvision import transforms

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = torchvision.models.resnet18(num_classes=2)
        self.model.load_state_dict(torch.load(weights, weights_only=True))
        self.model.eval()
        self.resize = transforms.Compose([transforms.Resize(round(size * 256 / 224)), transforms.CenterCrop(size)])
        self.to_tensor = transforms.Compose([transforms.ToTensor(),
                                             transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])

    def run(self, path: str) -> dict[str, float]:
        from PIL import Image

        t0 = time.perf_counter()
        img = Image.open(path).convert("RGB")
        t1 = time.perf_counter()
        x = self.to_tensor(self.resize(img)).unsqueeze(0)
        t2 = time.perf_counter()
        with self.torch.inference_mode():
            self.model(x)
        t3 = time.perf_counter()
        return {"decode": t1 - t0, "preprocess": t2 - t1, "infer": t3 - t2}


class PlainOrt:
    """(b) onnxruntime fp32, but the image still fully decoded and resized the usual way."""

    name = "ort-fp32"

    def __init__(self, onnx_path: Path, size: int, threads: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        self.size = size
        self.mean = np.array([0.485, 0.456, 0.406], np.float32)
        self.std = np.array([0.229, 0.224, 0.225], np.float32)

    def run(self, path: str) -> dict[str, float]:
        from PIL import Image

        t0 = time.perf_counter()
        img = Image.open(path).convert("RGB")
        t1 = time.perf_counter()
        short = round(self.size * 256 / 224)
        w, h = img.size
        scale = short / min(w, h)
        img = img.resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR)
        w, h = img.size
        left, top = (w - self.size) // 2, (h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        x = ((np.asarray(img, np.float32) / 255.0 - self.mean) / self.std).transpose(2, 0, 1)[None]
        t2 = time.perf_counter()
        self.sess.run(None, {"input": np.ascontiguousarray(x)})
        t3 = time.perf_counter()
        return {"decode": t1 - t0, "preprocess": t2 - t1, "infer": t3 - t2}


class FundusEdge:
    """(c)/(d)/(e) the fundus-edge runtime, with its image-quality gate (default) or without it."""

    def __init__(self, bundle: Path, artifact: str, threads: int, quality_gate: bool = True) -> None:
        from fundus_edge.runtime import BackendSettings, load
        from fundus_edge.runtime.quality import QualitySpec

        self.name = f"fe-{artifact.split('-')[-1]}" + ("" if quality_gate else "-noq")
        self.screener = load(bundle, artifact=artifact, settings=BackendSettings(threads=threads),
                             quality=None if quality_gate else QualitySpec(enabled=False))
        self.ungradable: set[str] = set()

    def run(self, path: str) -> dict[str, float]:
        r = self.screener.screen(path)
        if r.error:
            raise RuntimeError(r.error)
        if r.decision == "ungradable":  # stopped at the gate: no inference, as on the device
            self.ungradable.add(Path(path).name)
        t = {k: v / 1e3 for k, v in r.timings_ms.items()}
        return {"decode": t.get("decode", 0.0), "preprocess": t.get("preprocess", 0.0),
                "quality": t.get("quality", 0.0), "infer": t.get("infer", 0.0)}


COLD_CODE = {
    "naive": """
import sys, time, json
t0 = float(sys.argv[1])
sys.path.insert(0, {bench!r})
from e2e import Naive, peak_rss
p = Naive(__import__('pathlib').Path({weights!r}), {size}, {threads})
p.run({image!r})
first = time.time() - t0
for _ in range(3): p.run({image!r})
print(json.dumps({{"cold": first, "rss": peak_rss()}}))
""",
    "fe": """
import sys, time, json
t0 = float(sys.argv[1])
from fundus_edge.runtime import load, BackendSettings
s = load({bundle!r}, artifact={artifact!r}, settings=BackendSettings(threads={threads}))
s.screen({image!r})
first = time.time() - t0
for _ in range(3): s.screen({image!r})
from fundus_edge.runtime.bench import peak_rss_mb
print(json.dumps({{"cold": first, "rss": peak_rss_mb()}}))
""",
}


def _size(path: str) -> str:
    from PIL import Image

    with Image.open(path) as im:
        return f"{im.size[0]}x{im.size[1]}"


def peak_rss() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def cold(kind: str, **kw: Any) -> dict[str, float]:
    code = COLD_CODE[kind].format(bench=str(Path(__file__).parent), **kw)
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code, repr(t0)], capture_output=True, text=True, check=False)
    if r.returncode:
        raise RuntimeError(r.stderr[-800:])
    out: dict[str, float] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def run_size(size: int, images: list[str], rounds: int, threads: int, work: Path) -> dict[str, Any]:
    bundle = build_bundle(work, size)
    pipes: list[Any] = [Naive(work / "resnet18.pt", size, threads), PlainOrt(bundle / "model.fp32.onnx", size, threads),
                        FundusEdge(bundle, "onnx-fp32", threads), FundusEdge(bundle, "onnx-int8", threads),
                        FundusEdge(bundle, "onnx-int8", threads, quality_gate=False)]
    for p in pipes:  # warm-up
        p.run(images[0])
    times: dict[str, list[dict[str, float]]] = {p.name: [] for p in pipes}
    for _ in range(rounds):
        for img in images:
            for p in pipes:  # interleaved: A B C D A B C D
                times[p.name].append(p.run(img))
    summary: dict[str, Any] = {}
    for name, runs in times.items():
        stages = {k: 1e3 * statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}
        e2e = 1e3 * statistics.median(sum(r.values()) for r in runs)
        summary[name] = {"stages_ms": stages, "e2e_ms": e2e}
    for p in pipes:
        if isinstance(p, FundusEdge):
            summary[p.name]["ungradable"] = sorted(p.ungradable)
    largest = max(images, key=lambda i: Path(i).stat().st_size)
    summary["naive"].update(cold("naive", weights=str(work / "resnet18.pt"), size=size, threads=threads,
                                 image=largest))
    for art, name in (("onnx-fp32", "fe-fp32"), ("onnx-int8", "fe-int8")):
        summary[name].update(cold("fe", bundle=str(bundle), artifact=art, threads=threads, image=largest))
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--data", help="the open-fundus folder (default: datasets.open_fundus.find_root())")
    ap.add_argument("--synthetic", action="store_true", help="synthetic camera-sized photographs instead")
    a = ap.parse_args()
    results: dict[str, Any] = {"machine": os.uname().machine, "cpus": os.cpu_count(), "threads": a.threads,
                               "date": time.strftime("%Y-%m-%d"), "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="fe-e2e-") as tmp:
        work = Path(tmp)
        images = make_images(work) if a.synthetic else real_images(a.data)
        results["images"] = [f"{Path(i).name} ({_size(i)})" for i in images]
        print("images: " + ", ".join(results["images"]), flush=True)
        for size in a.sizes:
            print(f"== ResNet-18 @{size}, {len(images)} images x {a.rounds} rounds, {a.threads} thread(s)",
                  flush=True)
            s = run_size(size, images, a.rounds, a.threads, work)
            results["sizes"][size] = s
            print(f"{'pipeline':<12} {'decode':>8} {'prep':>8} {'quality':>8} {'infer':>8} {'e2e':>8} {'cold s':>7} "
                  f"{'RSS MB':>7}  ungradable")
            for name, v in s.items():
                st = v["stages_ms"]
                print(f"{name:<12} {st.get('decode', 0):8.1f} {st.get('preprocess', 0):8.1f} "
                      f"{st.get('quality', 0):8.1f} {st.get('infer', 0):8.1f} {v['e2e_ms']:8.1f} "
                      f"{v.get('cold', float('nan')):7.2f} {v.get('rss', float('nan')):7.0f}  "
                      f"{len(v.get('ungradable', []))}")
            n, i8, f32 = s["naive"], s["fe-int8"], s["fe-fp32"]
            ratios = {
                "e2e speed-up fe-int8 vs naive": n["e2e_ms"] / i8["e2e_ms"],
                "e2e speed-up fe-fp32 vs naive": n["e2e_ms"] / f32["e2e_ms"],
                "e2e speed-up fe-fp32 vs ort-fp32": s["ort-fp32"]["e2e_ms"] / f32["e2e_ms"],
                "int8 / fp32 inference": i8["stages_ms"]["infer"] / f32["stages_ms"]["infer"],
                "fe-int8 (decode+prep) share of e2e": (i8["stages_ms"]["decode"] + i8["stages_ms"]["preprocess"])
                / i8["e2e_ms"],
                "quality gate cost: fe-int8 / fe-int8-noq e2e": i8["e2e_ms"] / s["fe-int8-noq"]["e2e_ms"],
            }
            s["ratios"] = ratios
            for k, v in ratios.items():
                print(f"  {k}: {v:.2f}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
