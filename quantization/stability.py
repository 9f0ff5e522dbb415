"""Calibration stability of a bundle's ONNX int8 file: re-quantize it with K different calibration subsets and
gate each one, so the report shows how much of its ΔAUC and flips is the luck of one calibration draw.

The K files are quantized exactly as the shipped one was (the configuration the manifest records: calibrator,
per-channel, types, the nodes the fallback kept in float), from the bundle's fp32 ONNX file, on K seeded subsets
of a calibration folder. With the MinMax calibrator (the default) the calibration is done once: each calibration
image's per-tensor min/max is collected with onnxruntime's own calibrator, a subset's ranges are the min/max over
its images (what calibrating on that subset computes), written as onnxruntime's calibration cache
(``calibration_cache_path``) and quantized from it; other calibrators calibrate each subset in full.

Rule (flag UNSTABLE): the K files disagree in verdict (one FAILs where another does not), or their ΔAUC range
is wider than the ΔAUC margin, or their flip counts range over more than the flip limit allows on these images
(``max_flip_rate`` x n, at least 1). See docs/gate.md.

Needs onnx and onnxruntime (the [export] extra), not torch.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle.read import Bundle
from ..errors import UsageError
from ..gate.gate import GateCriteria, GateResult, gate
from ..gate.stage import GateData
from ..runtime.backends import BackendSettings, run_backend
from ..runtime.postprocess import referable_probability
from ..runtime.preprocess import relayout
from .calibration import ArrayCalibrationReader, prepare_inputs, select_calibration
from .quantize_onnx import OnnxQuantConfig, preprocess_for_quantization, quantize_onnx

Log = Callable[[str], None]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class StabilityConfig:
    k: int
    calib: Path  # folder of calibration images (the pool the K subsets are drawn from)
    calib_size: int | None = None  # images per subset (default: what the build used, else 128)
    seed: int = 1  # subset i is drawn with seed + i (the build draws its own with seed 0)


@dataclass(frozen=True)
class StabilityRun:
    """One re-quantization: its calibration subset and its gate against the reference."""

    seed: int
    indices: list[int]
    sha256: str
    gate: GateResult

    def to_dict(self) -> dict[str, Any]:
        g = self.gate
        return {"seed": self.seed, "calibration_indices": self.indices, "sha256": self.sha256,
                "delta_auc": g.delta_auc, "delta_sensitivity": g.delta_sensitivity,
                "delta_specificity": g.delta_specificity, "flips": g.flips, "verdict": g.verdict}


@dataclass
class Stability:
    artifact: str
    k: int
    pool: list[str]
    calib_size: int
    method: str
    runs: list[StabilityRun]
    n_images: int
    criteria: GateCriteria
    shipped: dict[str, Any] = field(default_factory=dict)  # the shipped file's numbers on the same images
    seconds: float = 0.0

    def spread(self, key: str) -> dict[str, float]:
        v = np.array([r.to_dict()[key] for r in self.runs], dtype=np.float64)
        return {"min": float(v.min()), "median": float(np.median(v)), "max": float(v.max()),
                "range": float(v.max() - v.min())}

    @property
    def flip_allowance(self) -> int:
        return max(1, int(np.floor(self.criteria.max_flip_rate * self.n_images)))

    @property
    def reasons(self) -> list[str]:
        out = []
        verdicts = sorted({r.gate.verdict for r in self.runs})
        if "FAIL" in verdicts and len(verdicts) > 1:
            out.append(f"verdicts differ across calibration subsets: {', '.join(verdicts)}")
        auc = self.spread("delta_auc")
        if auc["range"] > abs(self.criteria.min_delta_auc):
            out.append(f"ΔAUC ranges over {auc['range']:.4f} (more than the margin {abs(self.criteria.min_delta_auc)})")
        flips = self.spread("flips")
        if flips["range"] > self.flip_allowance:
            out.append(f"flips range over {flips['range']:.0f} (more than the {self.flip_allowance} the flip limit "
                       f"allows on {self.n_images} images)")
        return out

    @property
    def unstable(self) -> bool:
        return bool(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "k": self.k, "calibration_pool": len(self.pool),
                "calibration_pool_images": self.pool, "calib_size": self.calib_size, "method": self.method,
                "n_images": self.n_images, "runs": [r.to_dict() for r in self.runs],
                "spread": {k: self.spread(k) for k in ("delta_auc", "delta_sensitivity", "delta_specificity",
                                                       "flips")},
                "shipped": self.shipped, "unstable": self.unstable, "reasons": self.reasons,
                "rule": "UNSTABLE when verdicts differ with a FAIL among them, or the ΔAUC range exceeds the ΔAUC "
                        "margin, or the flips range exceeds max(1, max_flip_rate x n)",
                "seconds": round(self.seconds, 1)}


def per_image_ranges(pre: Path, tensors: np.ndarray, input_name: str, workdir: Path) -> list[dict[str, Any]]:
    """Each image's per-tensor (min, max) from onnxruntime's MinMax calibrator, on the tensors quantize_static
    calibrates (the QDQ and QLinear op registries)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    ops = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))
    cal = create_calibrator(pre, ops, augmented_model_path=str(workdir / "augmented.onnx"),
                            calibrate_method=CalibrationMethod.MinMax, extra_options={})
    out = []
    for t in tensors:
        cal.calibrate_tensors_range = None  # one image at a time: no merging with the previous one
        cal.collect_data(ArrayCalibrationReader(t[None], input_name))
        out.append({k: v.range_value for k, v in cal.compute_data().items()})
    return out


def write_cache(ranges: list[dict[str, Any]], subset: np.ndarray, path: Path) -> None:
    """onnxruntime's calibration cache for ``subset``: min of the minima, max of the maxima (NaN ignored)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData, save_tensors_data

    merged = {}
    for name in ranges[int(subset[0])]:
        lo = np.fmin.reduce([ranges[int(i)][name][0] for i in subset])
        hi = np.fmax.reduce([ranges[int(i)][name][1] for i in subset])
        merged[name] = (np.asarray(lo, dtype=np.float32), np.asarray(hi, dtype=np.float32))
    save_tensors_data(TensorsData(CalibrationMethod.MinMax, merged), path)


def _subsets(n_pool: int, size: int, k: int, seed: int) -> list[tuple[int, np.ndarray]]:
    if size >= n_pool:
        raise UsageError(f"--stability needs more calibration images than --calib-size ({n_pool} <= {size}): every "
                         "subset would be the same; give a bigger --calib folder or a smaller --calib-size")
    out: list[tuple[int, np.ndarray]] = []
    s = seed
    while len(out) < k:
        idx = select_calibration(n_pool, size, s)
        if not any(np.array_equal(idx, o) for _, o in out):
            out.append((s, idx))
        s += 1
    return out


def _pool(bundle: Bundle, cfg: StabilityConfig, layout: str) -> tuple[list[str], np.ndarray]:
    folder = Path(cfg.calib)
    if not folder.is_dir():
        raise UsageError(f"--calib {folder} is not a folder of calibration images")
    files = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    prepared = prepare_inputs(files, bundle.preprocessing)
    return prepared.sources, relayout(prepared.tensors, bundle.preprocessing.layout, layout)


def _quant_config(bundle: Bundle, artifact: str) -> tuple[OnnxQuantConfig, int | None]:
    rec = (bundle.manifest.get("quantization") or {}).get(artifact) or {}
    conf = dict(rec.get("config") or {})
    known = {k: v for k, v in conf.items() if k in OnnxQuantConfig.__dataclass_fields__}
    known["nodes_to_exclude"] = tuple(known.get("nodes_to_exclude", ()))
    return OnnxQuantConfig(**known), rec.get("n_calibration")


def calibration_stability(bundle: Bundle, data: GateData, reference_scores: np.ndarray, threshold: float,
                          criteria: GateCriteria, cfg: StabilityConfig, reference: str = "onnx-fp32",
                          settings: BackendSettings | None = None, log: Log | None = None) -> Stability:
    """Re-quantize the bundle's ONNX int8 file on ``cfg.k`` calibration subsets and gate each one on ``data``."""
    import hashlib

    import onnx

    say: Log = log or (lambda s: None)
    if cfg.k < 2:
        raise UsageError(f"--stability needs K >= 2 calibration subsets, got {cfg.k}")
    fp32 = next((a for a in bundle.artifacts if a.format == "onnx" and a.precision == "fp32"), None)
    int8 = next((a for a in bundle.artifacts if a.format == "onnx" and a.precision == "int8"), None)
    if fp32 is None or int8 is None:
        raise UsageError("--stability re-quantizes the bundle's ONNX fp32 file: this bundle lacks an ONNX fp32 or "
                         "int8 artifact")
    t0 = time.perf_counter()
    qcfg, n_build = _quant_config(bundle, int8.id)
    pool, tensors = _pool(bundle, cfg, fp32.layout)
    size = cfg.calib_size or min(n_build or 128, len(pool) - 1)
    subsets = _subsets(len(pool), size, cfg.k, cfg.seed)
    input_name = onnx.load(str(bundle.path(fp32)), load_external_data=False).graph.input[0].name
    x = relayout(data.tensors, data.layout, int8.layout)
    runs: list[StabilityRun] = []
    with tempfile.TemporaryDirectory(prefix="fe-stability-") as tmp:
        work = Path(tmp)
        pre = preprocess_for_quantization(bundle.path(fp32), work / "pre.onnx")
        cached = qcfg.calibrator == "minmax"
        ranges = per_image_ranges(pre, tensors, input_name, work) if cached else []
        method = ("per-image MinMax ranges merged into an onnxruntime calibration cache per subset" if cached
                  else f"full {qcfg.calibrator} calibration per subset")
        say(f"calibration stability: {cfg.k} subsets of {size} from {len(pool)} images ({method})")
        for seed, idx in subsets:
            out, cache = work / f"int8-{seed}.onnx", work / f"calib-{seed}.json"
            if cached:
                write_cache(ranges, idx, cache)
            quantize_onnx(bundle.path(fp32), out, tensors[idx], input_name, qcfg,
                          cache_path=cache if cached else None, preprocessed=pre)
            logits, _ = run_backend("onnx", out, x, settings)
            g = gate(f"{int8.id}~calib{seed}", data.labels, reference_scores,
                     referable_probability(logits, data.positive), threshold, criteria, reference)
            runs.append(StabilityRun(seed, [int(i) for i in idx], hashlib.sha256(out.read_bytes()).hexdigest(), g))
            say(f"  subset seed {seed}: ΔAUC {g.delta_auc:+.4f}, flips {g.flips} -> {g.verdict}")
    return Stability(int8.id, cfg.k, pool, size, method, runs, len(data.labels), criteria,
                     seconds=time.perf_counter() - t0)


def stability_lines(s: Stability) -> list[str]:
    auc, flips = s.spread("delta_auc"), s.spread("flips")
    lines = [f"calibration stability of {s.artifact}: {s.k} re-quantizations on subsets of {s.calib_size} of "
             f"{len(s.pool)} calibration images ({s.method}; {s.seconds:.0f} s)",
             f"  ΔAUC min/median/max {auc['min']:+.4f} / {auc['median']:+.4f} / {auc['max']:+.4f}; flips "
             f"{flips['min']:.0f} / {flips['median']:.0f} / {flips['max']:.0f} of {s.n_images}; verdicts "
             + ", ".join(r.gate.verdict for r in s.runs)]
    if s.shipped:
        lines.append(f"  shipped file on the same images: ΔAUC {s.shipped['delta_auc']:+.4f}, flips "
                     f"{s.shipped['flips']}")
    lines.append("  -> UNSTABLE: " + "; ".join(s.reasons) if s.unstable else "  -> stable by the documented rule")
    return lines


__all__ = ["Stability", "StabilityConfig", "calibration_stability", "per_image_ranges", "stability_lines",
           "write_cache"]
