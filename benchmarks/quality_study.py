"""How well do the default image-quality thresholds separate good from bad photographs? (synthetic data)

    python benchmarks/quality_study.py [--seed 9] [--n-good 150] [--n-bad 20] [--n-other 20] [--json]
    python benchmarks/quality_study.py --real [--json]   # real cameras (open-fundus set), see docs/quality.md

Builds a synthetic quality set (good photos of three synthetic camera colour profiles, the degradations of
``datasets/degrade.py`` applied to other photos, procedural non-fundus pictures), JPEG-encodes every image as a
camera would, and judges it with the default spec through the runtime's own preprocessing. Prints: per-measure
good-vs-bad ROC AUC, combined-score AUC overall and per camera, good pass rate, rejection per degradation and
per non-fundus kind, the CC0 real photographs, severity sweeps on the real photographs (where each measure
starts to reject), and the quality check's cost per image. Synthetic data: it tests the mechanism and the
defaults' consistency, not clinical gradability. Seeds 1 and 2 were used to tune the defaults; use others.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from fundus_edge.datasets import open_fundus
from fundus_edge.datasets.degrade import quality_set
from fundus_edge.datasets.real_variants import blurred_dark, inscribed_crop, mask_circle, pigmented
from fundus_edge.gate.metrics import auc
from fundus_edge.runtime.preprocess import PreprocessSpec, detect_fov, preprocess
from fundus_edge.runtime.quality import DEFAULT_BOUNDS, MEASURES, Bounds, QualitySpec, assess, compute_measures, judge

SAMPLES = Path(__file__).resolve().parent.parent / "tests" / "data" / "fundus"


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _oriented(name: str, values: np.ndarray, spec: QualitySpec) -> np.ndarray:
    b = spec.bounds[name]
    if b.min is not None and b.max is not None:
        return np.array([b.margin(float(v)) for v in values])
    return -values if b.max is not None else values


def study(seed: int, n_good: int, n_bad: int, n_other: int, spec: QualitySpec) -> dict[str, Any]:
    pspec = PreprocessSpec()
    rows: list[dict[str, Any]] = []
    cost: list[float] = []
    for s in quality_set(n_good, n_bad, n_other, seed=seed):
        pre = preprocess(_jpeg(s.image), pspec, quality_size=spec.size)
        r = assess(pre, spec)
        cost.append(r.timings_ms)
        rows.append({"label": s.label, "kind": s.kind, "camera": s.camera, "result": r})
    good = [x for x in rows if x["label"] == "good"]
    bad = [x for x in rows if x["label"] == "bad"]
    other = [x for x in rows if x["label"] == "non-fundus"]
    y = np.r_[np.ones(len(good)), np.zeros(len(bad))]
    per_measure = {}
    for name in MEASURES:
        v = np.array([x["result"].measures[name] for x in good + bad])
        per_measure[name] = auc(y, _oriented(name, v, spec))
    combined = auc(y, np.array([x["result"].score for x in good + bad]))
    # Per degradation kind: which measures separate it from the good photos (each measure targets one problem).
    per_kind_best: dict[str, dict[str, float]] = {}
    for kind in sorted({x["kind"] for x in bad}):
        kb = [x for x in bad if x["kind"] == kind]
        yk = np.r_[np.ones(len(good)), np.zeros(len(kb))]
        aucs = {name: auc(yk, _oriented(name, np.array([x["result"].measures[name] for x in good + kb]), spec))
                for name in MEASURES}
        per_kind_best[kind] = dict(sorted(aucs.items(), key=lambda kv: -kv[1])[:3])
    per_camera = {}
    for cam in sorted({x["camera"] for x in good}):
        g = [x["result"].score for x in good if x["camera"] == cam]
        b = [x["result"].score for x in bad if x["camera"] == cam]
        per_camera[cam] = {"auc": auc(np.r_[np.ones(len(g)), np.zeros(len(b))], np.array(g + b)),
                           "good_pass": float(np.mean([x["result"].gradable for x in good if x["camera"] == cam])),
                           "n_good": len(g), "n_bad": len(b)}

    def by_kind(items: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        groups: dict[str, list[Any]] = defaultdict(list)
        for x in items:
            groups[x["kind"]].append(x["result"])
        for kind, rs in groups.items():
            fails = Counter(f for r in rs for f in r.failed)
            out[kind] = {"n": len(rs), "rejected": float(np.mean([not r for r in rs])),
                         "top_failures": dict(fails.most_common(3))}
        return out

    return {
        "seed": seed, "n_good": len(good), "n_bad": len(bad), "n_non_fundus": len(other),
        "good_pass": float(np.mean([x["result"].gradable for x in good])),
        "bad_rejected": float(np.mean([not x["result"].gradable for x in bad])),
        "non_fundus_rejected": float(np.mean([not x["result"].gradable for x in other])),
        "combined_auc": combined, "per_camera": per_camera, "per_measure_auc": per_measure,
        "per_kind_best_measures": per_kind_best,
        "degradations": by_kind(bad), "non_fundus": by_kind(other),
        "assess_ms": {"p50": float(np.median(cost)), "p95": float(np.percentile(cost, 95))},
    }


def real_photos(spec: QualitySpec) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in sorted(SAMPLES.glob("*.jpg")):
        pre = preprocess(p, PreprocessSpec(), quality_size=spec.size)
        r = assess(pre, spec)
        out[p.name] = {"gradable": r.gradable, "score": r.score, "failed": r.failed,
                       "sharpness": r.measures["sharpness"], "vessels": r.measures["vessels"],
                       "brightness": r.measures["brightness"], "red_share": r.measures["red_share"]}
    return out


def sweeps(spec: QualitySpec) -> dict[str, Any]:
    """On each real photograph: how many of them still pass as one degradation grows."""
    photos = [Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.jpg"))]
    rng = np.random.default_rng(0)

    def blur(img: Image.Image, k: float) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(k * min(img.size))) if k else img

    def exposure(img: Image.Image, k: float) -> Image.Image:
        return ImageEnhance.Brightness(img).enhance(k)

    def noise(img: Image.Image, k: float) -> Image.Image:
        a = np.asarray(img, np.float32) + rng.normal(0, k, (img.size[1], img.size[0], 3)).astype(np.float32)
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))

    def haze(img: Image.Image, k: float) -> Image.Image:  # a veil over the field of view, not its black surround
        veiled = Image.blend(img, Image.new("RGB", img.size, (235, 200, 170)), k)
        inside = Image.fromarray(((np.asarray(img).max(axis=2) > 12) * 255).astype(np.uint8), "L")
        return Image.composite(veiled, img, inside.filter(ImageFilter.GaussianBlur(1.5)))

    plans: dict[str, tuple[Any, list[float]]] = {
        "blur sigma (% of short side)": (blur, [0, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01]),
        "exposure factor": (exposure, [0.15, 0.25, 0.35, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]),
        "noise sigma (grey levels)": (noise, [0, 4, 8, 12, 16, 24, 32]),
        "haze veil (blend)": (haze, [0, 0.2, 0.3, 0.4, 0.5, 0.6])}
    out: dict[str, Any] = {}
    for name, (fn, levels) in plans.items():
        rows = []
        for k in levels:
            rs = []
            for img in photos:
                pre = preprocess(_jpeg(fn(img, k), 92), PreprocessSpec(), quality_size=spec.size)
                rs.append(assess(pre, spec))
            rows.append({"level": k, "passed": sum(bool(r) for r in rs), "of": len(rs),
                         "failed": dict(Counter(f for r in rs for f in r.failed).most_common(2))})
        out[name] = rows
    return out


def timing(spec: QualitySpec, repeats: int = 200) -> dict[str, float]:
    """The quality check alone on one 224-px crop: min over batches of wall and of CPU time (on a shared,
    loaded machine the CPU time is the steadier of the two)."""
    from fundus_edge.runtime.quality import compute_measures

    pre = preprocess(sorted(SAMPLES.glob("*.jpg"))[0], PreprocessSpec(), quality_size=spec.size)
    crop = pre.quality_image
    assert crop is not None  # asked for with quality_size

    best = best_cpu = float("inf")
    for _ in range(5):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            judge(compute_measures(crop, pre.fov, pre.decoded_size), spec)
        best = min(best, (time.perf_counter() - t0) / repeats * 1e3)
        best_cpu = min(best_cpu, (time.process_time() - c0) / repeats * 1e3)
    return {"assess_ms_best": best, "assess_cpu_ms_best": best_cpu}


# ----------------------------------------------------------------------------------- real cameras
CAMERAS = {"idrid": "IDRiD (Kowa VX-10a)", "hrf": "HRF (Canon CR-1)", "chase_db1": "CHASE_DB1 (Nidek NM-200-D)"}
VARIANTS = ("full", "inscribed", "pigment-0.8", "pigment-0.6", "blurred-dark")


def _reference_fov(photo: Any, img: Image.Image) -> tuple[float, float, float]:
    """The field of view in the photo's own pixels: HRF's expert mask, else the detector at full resolution."""
    if photo.fov is not None:
        mask = np.asarray(Image.open(photo.fov).convert("L")) > 127
        return mask_circle(mask)
    fov = detect_fov(img, PreprocessSpec(draft=False))
    return fov.cx, fov.cy, fov.radius


def real_variant_images(photo: Any) -> dict[str, bytes]:
    """The variants of one real photograph that the default spec must pass (or, blurred-dark, refuse)."""
    img = Image.open(photo.path).convert("RGB")
    cx, cy, r = _reference_fov(photo, img)
    return {"full": photo.path.read_bytes(), "inscribed": _jpeg(inscribed_crop(img, cx, cy, r), 92),
            "pigment-0.8": _jpeg(pigmented(img, 0.8, 0.25), 92), "pigment-0.6": _jpeg(pigmented(img, 0.6, 0.5), 92),
            "blurred-dark": _jpeg(blurred_dark(img), 92)}


def real_measures(root: Path, part: tuple[int, int] = (0, 1)) -> list[dict[str, Any]]:
    """Quality measures of every variant of every open-fundus photograph (IDRiD train+test, HRF, CHASE_DB1);
    ``part`` (i, n): only every n-th photograph from the i-th (to run in parallel)."""
    rows = []
    spec = QualitySpec()
    for photo in open_fundus.all_photos(root)[part[0]::part[1]]:
        for variant, data in real_variant_images(photo).items():
            pre = preprocess(data, PreprocessSpec(), quality_size=spec.size)
            rows.append({"camera": photo.dataset, "name": photo.path.name, "variant": variant,
                         "measures": compute_measures(pre.quality_image, pre.fov, pre.decoded_size)})
    return rows


def real_table(rows: list[dict[str, Any]], spec: QualitySpec) -> dict[str, dict[str, Any]]:
    """Per camera and variant: pass rate and the measures that fail most often."""
    out: dict[str, dict[str, Any]] = {}
    for cam in CAMERAS:
        for variant in VARIANTS:
            rs = [judge(x["measures"], spec) for x in rows if x["camera"] == cam and x["variant"] == variant]
            if rs:
                fails = Counter(f for r in rs for f in r.failed)
                out.setdefault(cam, {})[variant] = {"n": len(rs), "passed": float(np.mean([bool(r) for r in rs])),
                                                    "binding": dict(fails.most_common(3))}
    return out


GOOD_VARIANTS = ("full", "inscribed", "pigment-0.8", "pigment-0.6")
# Measures whose bounds real cameras reach: lower bounds loosened to `slack` x the fitted cameras' 1st
# percentile, upper bounds to 1 / `slack` x their 99th; never tightened. Sharpness is NOT fitted: below 0.22
# the synthetic motion blur passes (see docs/quality.md), so it stays where the synthetic study puts it.
FIT_MIN = ("vessels", "contrast", "red_share", "brightness")
FIT_MAX = ("noise", "hue_spread", "dark_area", "saturated")
# The starting point of the fit: the bounds tuned on synthetic degradations before any real camera was seen,
# with the two choices made from the synthetic sets alone: sharpness 0.22 (the lowest that still refuses every
# synthetic motion blur) and a hue-spread floor of 0.7 degrees (a single-tint surface such as a wooden floor).
SYNTHETIC_START = {**{k: b.to_dict() for k, b in DEFAULT_BOUNDS.items()},
                   "red_share": {"min": 0.47}, "vessels": {"min": 0.12}, "contrast": {"min": 0.05},
                   "brightness": {"min": 0.14, "max": 0.65}, "sharpness": {"min": 0.22},
                   "hue_spread": {"min": 0.7, "max": 12.0}, "noise": {"max": 2.0}, "dark_area": {"max": 0.1},
                   "saturated": {"max": 0.1}}


def fit_bounds(rows: list[dict[str, Any]], cameras: tuple[str, ...], slack: float = 0.9) -> QualitySpec:
    """SYNTHETIC_START with the bounds that the good variants of ``cameras`` reach loosened (FIT_MIN, FIT_MAX)."""
    base = QualitySpec.from_dict({"measures": SYNTHETIC_START})
    good = [x["measures"] for x in rows if x["camera"] in cameras and x["variant"] in GOOD_VARIANTS]
    bounds = dict(base.bounds)
    for name in FIT_MIN + FIT_MAX:
        v = np.array([m[name] for m in good])
        b = bounds[name]
        if name in FIT_MIN and b.min is not None:
            bounds[name] = Bounds(min=min(b.min, float(np.quantile(v, 0.01)) * slack), max=b.max, scale=b.scale)
        elif name in FIT_MAX and b.max is not None:
            bounds[name] = Bounds(min=b.min, max=max(b.max, float(np.quantile(v, 0.99)) / slack), scale=b.scale)
    return QualitySpec(size=base.size, bounds=bounds, source=f"fitted on {', '.join(cameras)}")


def held_out(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Fit on two cameras, judge the third: pass rate per variant of the held-out camera."""
    out = {}
    for cam in CAMERAS:
        spec = fit_bounds(rows, tuple(c for c in CAMERAS if c != cam))
        out[cam] = real_table([x for x in rows if x["camera"] == cam], spec)[cam]
    return out


def _real_main(spec: QualitySpec, as_json: bool) -> int:
    rows = real_measures(open_fundus.find_root())
    res = {"defaults": real_table(rows, spec), "held_out": held_out(rows),
           "fitted_on_all": {k: b.to_dict() for k, b in fit_bounds(rows, tuple(CAMERAS)).bounds.items()}}
    if as_json:
        print(json.dumps(res, indent=2))
        return 0
    for title, table in (("default spec", res["defaults"]), ("held out (bounds fitted on the other two)",
                                                             res["held_out"])):
        print(f"{title}: pass rate per camera and variant (blurred-dark must be refused), most frequent failures")
        for cam, variants in table.items():
            for variant, d in variants.items():
                print(f"  {CAMERAS[cam]:<28} {variant:<13} {d['passed']:6.1%} of {d['n']:3d}  {d['binding']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--n-good", type=int, default=150)
    ap.add_argument("--n-bad", type=int, default=20, help="per degradation kind")
    ap.add_argument("--n-other", type=int, default=20, help="per non-fundus kind")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--real", action="store_true",
                    help="only the real cameras: per-camera table of the open-fundus photographs and their variants, "
                         "and the held-out fit (fit on two cameras, judge the third); a few minutes")
    args = ap.parse_args(argv)
    spec = QualitySpec()
    if args.real:
        return _real_main(spec, args.json)
    t0 = time.perf_counter()
    res: dict[str, Any] = {"study": study(args.seed, args.n_good, args.n_bad, args.n_other, spec),
                           "real": real_photos(spec), "sweeps": sweeps(spec), "timing": timing(spec)}
    res["seconds"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    s = res["study"]
    print(f"synthetic quality set, seed {s['seed']}: {s['n_good']} good (3 camera profiles), {s['n_bad']} degraded, "
          f"{s['n_non_fundus']} non-fundus")
    print(f"good pass {s['good_pass']:.1%}; degraded rejected {s['bad_rejected']:.1%}; non-fundus rejected "
          f"{s['non_fundus_rejected']:.1%}; combined-score AUC good vs degraded {s['combined_auc']:.4f}")
    for cam, c in s["per_camera"].items():
        print(f"  camera {cam:<9} AUC {c['auc']:.4f}  good pass {c['good_pass']:.1%}  ({c['n_good']} good, "
              f"{c['n_bad']} degraded)")
    print("per-measure AUC (good vs all degradations; a measure aimed at one failure mode scores low on the mix):")
    print("  " + ", ".join(f"{k} {v:.3f}" for k, v in s["per_measure_auc"].items()))
    print("best single measures per degradation kind (AUC good vs that kind):")
    for kind, best in s["per_kind_best_measures"].items():
        print(f"  {kind:<13} " + ", ".join(f"{k} {v:.3f}" for k, v in best.items()))
    for title, key in (("degradation", "degradations"), ("non-fundus", "non_fundus")):
        for kind, d in s[key].items():
            print(f"  {title:<11} {kind:<13} rejected {d['rejected']:6.1%} of {d['n']:3d}  {d['top_failures']}")
    print("CC0 real photographs:")
    for name, r in res["real"].items():
        print(f"  {name:<11} {'GRADABLE' if r['gradable'] else 'UNGRADABLE ' + str(r['failed'])} score "
              f"{r['score']:.3f} sharpness {r['sharpness']:.3f} vessels {r['vessels']:.3f}")
    print("severity sweeps on the real photographs (passed / total):")
    for name, rows in res["sweeps"].items():
        print(f"  {name:<30} " + "  ".join(f"{r['level']:g}:{r['passed']}/{r['of']}" for r in rows))
    print(f"quality check cost: p50 {s['assess_ms']['p50']:.2f} ms per image over the set (wall); on one 224-px "
          f"crop best {res['timing']['assess_ms_best']:.2f} ms wall, {res['timing']['assess_cpu_ms_best']:.2f} ms CPU "
          f"({res['seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
