"""``fundus-edge build --task segmentation``: a dense (vessel) model -> ONNX fp32 with dynamic H/W (parity vs
PyTorch on real tiles) -> int8 QDQ calibrated on real photos' tiles, its output head kept in float (plain int8 is
measured too, for the report) -> the segmentation gate (gate/segmentation.py) on the shipped files through the
runtime -> bundle (task "segmentation", the dense preprocessing in the manifest).

With ``tflite`` in the formats, a fixed-size TFLite fp32 + int8 pair too (pipeline/build_seg_tflite.py), gated
the same way.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..datasets.labels import list_images
from ..datasets.masks import MaskedImage, read_masks_csv
from ..errors import ExportError, UsageError
from ..export.contract import OutputContract
from ..gate.plots_seg import roc_from_histograms
from ..gate.segmentation import SegmentationCriteria, evaluate, judge
from ..runtime.backends import BackendSettings
from ..runtime.dense import DensePreprocessSpec, prepare
from .config import BuildConfig, BuildResult
from .progress import Log, Progress, stderr_log

CALIB_PHOTOS = 16  # at most this many calibration photos (each gives ~10 tiles)
CALIB_TILES = 64  # at most this many tiles calibrate the int8 ranges
PARITY_TILES = 12


@dataclass(frozen=True)
class SegModel:
    module: Any
    source: str
    arch: str | None
    meta: dict[str, Any]
    dense: DensePreprocessSpec
    contract: OutputContract


@dataclass
class SegBuild:
    """What the stages produced, for the report and the manifest."""

    cfg: BuildConfig
    model: SegModel
    val: list[MaskedImage]
    calibration: dict[str, Any]
    export: dict[str, Any]
    quantization: dict[str, Any]
    gate: dict[str, Any]
    threshold_rule: str
    no_tflite: str | None = None  # why no TFLite files were built (None: they were)


def _tiles(paths: list[Path], dense: DensePreprocessSpec, limit: int, seed: int) -> np.ndarray:
    """Tiles of the photos that hold any FOV pixel, a seeded subset of at most ``limit``."""
    tiles = []
    for p in paths:
        t = prepare(p, dense).tensors
        tiles.append(t[np.abs(t).reshape(len(t), -1).max(axis=1) > 0])
    all_tiles = np.concatenate(tiles)
    if len(all_tiles) > limit:
        pick = np.sort(np.random.default_rng(seed).choice(len(all_tiles), limit, replace=False))
        all_tiles = all_tiles[pick]
    return np.ascontiguousarray(all_tiles, dtype=np.float32)


def _dense_spec(cfg: BuildConfig, meta: dict[str, Any]) -> DensePreprocessSpec:
    if cfg.dense is not None:
        return cfg.dense
    return DensePreprocessSpec.from_dict(meta["dense_preprocessing"]) if "dense_preprocessing" in meta \
        else DensePreprocessSpec()


def export_and_check(m: SegModel, staging: Path, parity_x: np.ndarray, cfg: BuildConfig, progress: Progress
                     ) -> tuple[Path, dict[str, Any]]:
    """fp32 ONNX with dynamic batch, H and W; PyTorch vs the file (runtime backend) on real tiles and on an
    input of another size. Raises :class:`ExportError` beyond ``cfg.export_atol``."""
    from ..export.onnx import export_onnx
    from ..export.validate import torch_outputs
    from ..runtime.backends import run_backend

    progress.stage(f"exporting ONNX fp32 ({cfg.exporter} exporter, dynamic H/W) and checking parity")
    path = staging / "model.fp32.onnx"
    exp = export_onnx(m.module, path, m.dense.tile or PROBE, "NCHW", cfg.exporter, channels=m.dense.channels,
                      dynamic_hw=True)
    other = np.ascontiguousarray(parity_x[:1, :, : 3 * m.dense.multiple * 4, : 5 * m.dense.multiple * 4])
    diffs: dict[str, dict[str, Any]] = {}
    worst = 0.0
    for name, x in (("tiles", parity_x), ("other-size", other)):
        ref = torch_outputs(m.module, x, batch=4)
        got, _ = run_backend("onnx", path, x, BackendSettings(threads=cfg.threads))
        if got.shape != ref.shape:
            raise ExportError(f"the ONNX file outputs {got.shape} for {x.shape}, PyTorch {ref.shape}")
        diff = float(np.abs(got - ref).max())
        diffs[name] = {"shape": list(x.shape), "max_abs_diff": diff}
        worst = max(worst, diff)
    if worst > cfg.export_atol:
        raise ExportError(f"the ONNX file disagrees with PyTorch by {worst:.2e} > --export-atol {cfg.export_atol}; "
                          "try --exporter legacy")
    progress.say(f"parity vs PyTorch: max |Δlogit| {worst:.2e} on {len(parity_x)} tiles and a "
                 f"{other.shape[2]}x{other.shape[3]} input ({progress.seconds()})")
    return path, {**exp.to_dict(), "parity": diffs, "atol": cfg.export_atol, "dynamic_axes": ["batch", "H", "W"]}


def float_nodes(path: Path, output_block: int = 5) -> tuple[list[str], list[str]]:
    """The ONNX nodes kept in float: (the head: the last Conv to the graph output; the stem Conv plus the
    ``output_block`` last Convs, for the reference U-Net its last two decoder blocks and the head, plus whatever
    follows the head)."""
    import onnx

    g = onnx.load(str(path)).graph
    producer = {o: n for n in g.node for o in n.output}
    head: list[str] = []
    node = producer.get(g.output[0].name)
    while node is not None:
        head.append(node.name)
        if node.op_type in ("Conv", "ConvTranspose"):
            break
        node = next((producer[i] for i in node.input if i in producer), None)
    convs = [n.name for n in g.node if n.op_type in ("Conv", "ConvTranspose")]
    ends = list(dict.fromkeys([*convs[:1], *convs[-output_block:], *head]))
    return head, ends


# int8 candidates: the shipped one keeps the stem and the output blocks in float. Measured on 6 HRF + CHASE_DB1
# test photos: plain int8 and head-only lose 0.004 pixel AUC, fp32-vs-int8 mask Dice 0.92; stem + last decoder
# block + head: ΔAUC -0.0001 but Dice 0.9685 on one photo; stem + last two decoder blocks + head: ΔAUC -0.0003,
# Dice >= 0.973 on every photo. The other two are measured for the report, not shipped.
SHIPPED_INT8 = "onnx-int8"
MEASURED_ONLY = ("onnx-int8-plain", "onnx-int8-head")


def quantize_stage(fp32: Path, staging: Path, calib: np.ndarray, cfg: BuildConfig, progress: Progress
                   ) -> dict[str, tuple[Path, dict[str, Any]]]:
    """int8 QDQ: the shipped file (stem + output blocks in float) and, measured only, plain int8 and head-only."""
    from ..export.onnx import INPUT_NAME
    from ..quantization.quantize_onnx import OnnxQuantConfig, preprocess_for_quantization, quantize_onnx

    progress.stage(f"quantizing to int8 (QDQ, per-channel, {cfg.calibrator}) on {len(calib)} calibration tiles; "
                   "stem and output blocks kept in float (plain int8 and head-only measured too)")
    pre = preprocess_for_quantization(fp32, staging / "pre.onnx")
    head, ends = float_nodes(fp32)
    user = tuple(cfg.exclude_nodes)
    out: dict[str, tuple[Path, dict[str, Any]]] = {}
    candidates = ((SHIPPED_INT8, (*ends, *user)), ("onnx-int8-plain", user), ("onnx-int8-head", (*head, *user)))
    for key, excluded in candidates:
        path = staging / ("model.int8.onnx" if key == SHIPPED_INT8 else f"{key}.onnx")
        q = quantize_onnx(fp32, path, calib, INPUT_NAME,
                          OnnxQuantConfig(calibrator=cfg.calibrator, nodes_to_exclude=tuple(dict.fromkeys(excluded))),
                          preprocessed=pre)
        out[key] = (path, {**q.to_dict(), "kept_in_float": list(dict.fromkeys(excluded)),
                           "ships": key == SHIPPED_INT8})
        progress.say(f"{key}: int8 MAC share {q.int8_mac_fraction:.1%}, kept in float: {list(excluded) or 'none'}")
    pre.unlink()
    return out


PROBE = 64


def prepare_stage(cfg: BuildConfig, dense: DensePreprocessSpec, progress: Progress
                  ) -> tuple[list[MaskedImage], np.ndarray, np.ndarray, dict[str, Any]]:
    if cfg.calib is None or cfg.val is None:
        raise UsageError("build --task segmentation needs --calib (a folder of fundus photos) and --val (a masks "
                         "CSV: image,mask[,fov])")
    progress.stage("preparing calibration and parity tiles (runtime dense preprocessing)")
    val = read_masks_csv(cfg.val)
    files = list_images(cfg.calib)
    n = min(len(files), cfg.calib_size, CALIB_PHOTOS)
    pick = np.sort(np.random.default_rng(cfg.calib_seed).choice(len(files), n, replace=False))
    calib = _tiles([files[i] for i in pick], dense, CALIB_TILES, cfg.calib_seed)
    parity = np.concatenate([calib[:PARITY_TILES // 2], _tiles([v.image for v in val[:2]], dense,
                                                                PARITY_TILES // 2, cfg.calib_seed)])
    selection = {"from": str(cfg.calib), "available": len(files), "photos": n, "tiles": len(calib),
                 "seed": cfg.calib_seed, "method": f"seeded random photos (<= {CALIB_PHOTOS}), then tiles holding "
                 f"FOV pixels (<= {CALIB_TILES})"}
    progress.say(f"{len(val)} validation photos with masks; {len(calib)} calibration tiles from {n} photos "
                 f"({progress.seconds()})")
    return val, calib, parity, selection


def run_segmentation_build(cfg: BuildConfig, loaded: Any, contract: OutputContract, log: Log | None = None,
                           signer: Any = None) -> BuildResult:
    """Run the segmentation build on a loaded model whose output fits the segmentation contract."""
    from .build_seg_tflite import tflite_stage, why_not
    from .bundle_seg import write_seg_bundle

    meta = loaded.meta
    m = SegModel(loaded.module, loaded.source, loaded.arch or meta.get("arch"), meta, _dense_spec(cfg, meta),
                 contract)
    no_tflite = why_not(m) if "tflite" in cfg.formats else "not asked for (--formats)"
    progress = Progress(log or stderr_log, 5 if no_tflite else 6)
    if no_tflite and "tflite" in cfg.formats:
        progress.say(f"note: TFLite not built: {no_tflite}")
    val, calib, parity, selection = prepare_stage(cfg, m.dense, progress)
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    staging = cfg.out.parent / f".{cfg.out.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        fp32, export_info = export_and_check(m, staging, parity, cfg, progress)
        quant = quantize_stage(fp32, staging, calib, cfg, progress) if "int8" in cfg.precisions else {}
        tfl = {} if no_tflite else tflite_stage(m, staging, calib, parity, cfg, progress)
        progress.stage(f"segmentation gate on {len(val)} photos through the runtime")
        files: dict[str, Path | tuple[str, Path]] = {"onnx-fp32": fp32, **{k: p for k, (p, _) in quant.items()},
                                                     **{k: ("tflite", p) for k, (p, _) in tfl.items()}}
        evals = evaluate(files, val, m.dense, BackendSettings(threads=cfg.threads))
        meta_t = meta.get("threshold")
        rule = "the model's threshold" if meta_t is not None else "max F1 on the validation photos"
        crit = cfg.seg_criteria or SegmentationCriteria()
        gate = judge(evals, "onnx-fp32", float(meta_t) if meta_t is not None else None, crit,
                     measured_only=MEASURED_ONLY)
        gate["roc"] = {k: roc_from_histograms(e.pos, e.neg) for k, e in evals.items()}  # the report's figure
        for g in gate["gates"]:
            progress.say(f"{g['artifact']}: AUC {g['auc']:.4f} (Δ {g['delta_auc']:+.4f}), F1 {g['f1']:.4f} "
                         f"(Δ {g['delta_f1']:+.4f}), min mask Dice {g['min_mask_dice']:.4f} -> "
                         f"{'PASS' if g['passed'] else 'FAIL'}")
        b = SegBuild(cfg, m, val, selection, {"onnx-fp32": export_info, **{k: i for k, (_, i) in tfl.items()
                                                                            if k == "tflite-fp32"}},
                     {k: info for k, (_, info) in [*quant.items(), *tfl.items()] if k != "tflite-fp32"}, gate, rule,
                     no_tflite)
        return write_seg_bundle(b, staging, progress, signer)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def route_task(cfg: BuildConfig, signer: Any, log: Log | None) -> BuildResult | None:
    """``--task segmentation|auto``: load and probe the model; build it here when it is a segmentation model,
    return None for a classifier (the classification build goes on). Raises :class:`OutputContractError`."""
    from ..export.load import load_model
    from .stages import preprocessing_for
    from .task import resolve_task

    loaded = load_model(cfg.model, cfg.arch, cfg.num_classes)
    spec = preprocessing_for(cfg, loaded.meta)
    task, contract, _ = resolve_task(loaded.module, cfg.task, loaded.meta, spec.size, spec.layout)
    if task != "segmentation":
        return None
    return run_segmentation_build(cfg, loaded, contract, log, signer)
