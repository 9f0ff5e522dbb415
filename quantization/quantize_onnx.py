"""Static int8 quantization of ONNX models with onnxruntime (QDQ, per-channel, uint8 activations / int8 weights).

Measured on the 2-core x86 CI machine: uint8 activations + int8 weights make ResNet-18 2.4x faster than fp32;
int8 activations gave no speed-up. Calibration ranges can be cached (``calibration_cache_path``, ORT >= 1.32)
so that re-quantizing with different exclusions does not recalibrate.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingDependencyError, QuantizationError
from .calibration import ArrayCalibrationReader

CALIBRATORS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class OnnxQuantConfig:
    """Typed settings instead of onnxruntime's string-keyed ``extra_options``."""

    calibrator: str = "minmax"
    per_channel: bool = True
    activation_type: str = "uint8"
    weight_type: str = "int8"
    reduce_range: bool = False
    nodes_to_exclude: tuple[str, ...] = ()
    strided_minmax: int | None = None  # calibrate N images at a time to bound memory
    percentile: float = 99.999

    def __post_init__(self) -> None:
        if self.calibrator not in CALIBRATORS:
            raise QuantizationError(f"calibrator must be one of {CALIBRATORS}, got {self.calibrator!r}")
        for name in (self.activation_type, self.weight_type):
            if name not in ("uint8", "int8"):
                raise QuantizationError(f"quant types are 'uint8' or 'int8', got {name!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["nodes_to_exclude"] = list(self.nodes_to_exclude)
        return d


@dataclass
class OnnxQuantResult:
    path: Path
    config: OnnxQuantConfig
    n_calibration: int
    seconds: float
    op_counts: dict[str, int] = field(default_factory=dict)
    quantized_ops: dict[str, int] = field(default_factory=dict)
    float_ops: dict[str, int] = field(default_factory=dict)
    int8_mac_fraction: float = 0.0
    preprocess: str = "unknown"  # one of PREPROCESS_PATHS; "unknown": a pre-processed file made elsewhere
    preprocess_failed: list[str] = field(default_factory=list)  # why the paths before it were not taken

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": "onnxruntime.quantization.quantize_static",
            "format": "QDQ",
            "config": self.config.to_dict(),
            "n_calibration": self.n_calibration,
            "seconds": round(self.seconds, 2),
            "op_counts": self.op_counts,
            "quantized_ops": self.quantized_ops,
            "float_ops": self.float_ops,
            "int8_mac_fraction": round(self.int8_mac_fraction, 4),
            "preprocess": self.preprocess,
            "preprocess_failed": self.preprocess_failed,
        }


def _ort_quant() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "export", "ONNX quantization") from exc
    return quantization


PREPROCESS_PATHS = ("symbolic", "onnx-shape-inference", "none")
PREPROCESS_META_KEY = "fundus_edge.quant_preprocess"  # which path made a pre-processed model (metadata_props)


def _run_pre_process(q: Any, src: Path, dst: Path, path: str) -> None:
    if path == "none":
        import onnx

        onnx.save(onnx.load(str(src)), str(dst))  # unchanged: quantize_static infers what it needs itself
        return
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="fe-qpre-") as tmp:
        os.chdir(tmp)
        try:
            q.quant_pre_process(str(src), str(dst), skip_optimization=True,
                                skip_symbolic_shape=path != "symbolic")
        finally:
            os.chdir(cwd)


def _tag(dst: Path, path: str, failed: list[str]) -> None:
    import onnx

    model = onnx.load(str(dst))
    props = {p.key: p.value for p in model.metadata_props}
    props[PREPROCESS_META_KEY] = path
    props[PREPROCESS_META_KEY + ".failed"] = " | ".join(failed)
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(dst))


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""


def preprocess_path_of(preprocessed: Path) -> tuple[str, list[str]]:
    """Which pre-processing path made ``preprocessed`` and why the ones before it failed ("unknown" when the
    file was not made by :func:`preprocess_for_quantization`)."""
    import onnx

    props = {p.key: p.value for p in onnx.load(str(preprocessed), load_external_data=False).metadata_props}
    failed = props.get(PREPROCESS_META_KEY + ".failed", "")
    return props.get(PREPROCESS_META_KEY, "unknown"), [f for f in failed.split(" | ") if f]


def preprocess_for_quantization(fp32: Path, out: Path) -> Path:
    """``quant_pre_process`` (shape inference) without its onnxruntime graph optimisation: the exporters
    already fold BatchNorm and constants, and the optimiser drops node names and the exporter's module-path
    metadata (measured: 56 of 122 MobileNetV3 nodes unnamed, so they could neither be excluded by the fallback
    nor reported), and splits HardSwish into HardSigmoid * x. It writes temp files into the current
    directory, so it runs inside a temporary one. Needs sympy.

    Degrades: when onnxruntime's symbolic shape inference fails ("Incomplete symbolic shape inference": a U-Net
    with dynamic H and W, whose skip connections concatenate ``H`` with ``2*floor(H/2)``), it retries with
    ONNX's own shape inference, then with no pre-processing. The path taken ("symbolic" |
    "onnx-shape-inference" | "none") is written into the output's metadata (:func:`preprocess_path_of`) and
    reported by :func:`quantize_onnx`. Raises :class:`QuantizationError` when no path works."""
    q = _ort_quant()
    try:
        import sympy  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("sympy", "export", "ONNX quantization pre-processing") from exc
    src, dst = fp32.resolve(), out.resolve()
    failed: list[str] = []
    for path in PREPROCESS_PATHS:
        try:
            _run_pre_process(q, src, dst, path)
        except Exception as exc:
            failed.append(f"{path}: {type(exc).__name__}: {_first_line(exc)}")
            continue
        _tag(dst, path, failed)
        return out
    raise QuantizationError(
        f"cannot prepare {fp32.name} for quantization ({'; '.join(failed)}). Check that the file loads "
        "(python -c \"import onnx; onnx.checker.check_model('MODEL', full_check=True)\"), or ship it in float "
        "(fundus-edge build --precisions fp32)")


def quantize_onnx(fp32: Path, out: Path, calibration: np.ndarray, input_name: str,
                  config: OnnxQuantConfig | None = None, cache_path: Path | None = None,
                  preprocessed: Path | None = None) -> OnnxQuantResult:
    """Quantize ``fp32`` to ``out``. ``preprocessed``: an existing quant_pre_process output to reuse."""
    q = _ort_quant()
    cfg = config or OnnxQuantConfig()
    t0 = time.perf_counter()
    method = {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
              "percentile": q.CalibrationMethod.Percentile}[cfg.calibrator]
    qtype = {"uint8": q.QuantType.QUInt8, "int8": q.QuantType.QInt8}
    extra: dict[str, Any] = {}
    if cfg.strided_minmax and cfg.calibrator == "minmax":
        extra["CalibStridedMinMax"] = cfg.strided_minmax
    if cfg.calibrator == "percentile":
        extra["CalibPercentile"] = cfg.percentile
    with contextlib.ExitStack() as stack:
        stack.enter_context(_quiet_rank1_axis_warnings())
        if preprocessed is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fe-q-")))
            preprocessed = preprocess_for_quantization(fp32, tmp / "pre.onnx")
        pre_path, pre_failed = preprocess_path_of(preprocessed)
        reader = ArrayCalibrationReader(calibration, input_name)
        try:
            q.quantize_static(
                str(preprocessed), str(out), reader, quant_format=q.QuantFormat.QDQ,
                per_channel=cfg.per_channel, reduce_range=cfg.reduce_range,
                activation_type=qtype[cfg.activation_type], weight_type=qtype[cfg.weight_type],
                nodes_to_exclude=list(cfg.nodes_to_exclude), calibrate_method=method,
                extra_options=extra, calibration_cache_path=str(cache_path) if cache_path else None,
            )
        except Exception as exc:
            raise QuantizationError(
                f"onnxruntime quantize_static failed ({type(exc).__name__}: {_first_line(exc, 300)}; "
                f"pre-processing: {pre_path}). "
                "Try keeping the failing nodes in float (--exclude-nodes NAME ...), another --calibrator, or ship "
                "the model in float (fundus-edge build --precisions fp32)") from exc
    result = OnnxQuantResult(out, cfg, len(calibration), time.perf_counter() - t0, preprocess=pre_path,
                             preprocess_failed=pre_failed)
    summarize_qdq(out, result)
    return result


class _Rank1AxisFilter(logging.Filter):
    """onnxruntime warns "Axis 1 is out-of-range for weight '...ln_1.weight' with rank 1" for every 1-D weight
    (LayerNorm scales) when per-channel is on, and quantizes it per tensor, which is right for a 1-D weight. On a
    transformer that is a dozen lines per quantization, hundreds in a fallback search: they are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not (msg.startswith("Axis ") and "is out-of-range for weight" in msg and "with rank 1" in msg)


@contextlib.contextmanager
def _quiet_rank1_axis_warnings() -> Iterator[None]:
    root = logging.getLogger()
    filt = _Rank1AxisFilter()
    root.addFilter(filt)
    try:
        yield
    finally:
        root.removeFilter(filt)


_MAC_OPS = ("Conv", "MatMul", "Gemm", "ConvTranspose")


SYMBOLIC_SIDE = 256  # a dynamic height/width is counted at this size (MAC shares do not depend on it)


def _graph_facts(path: Path) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, list[int]]]:
    """The shape-inferred graph, its producers by output name, initializers, and every value's shape (batch 1;
    a dynamic input side, as in a dense model's file, at :data:`SYMBOLIC_SIDE`: left symbolic, every
    convolution would count as 1 x 1 pixels and the int8 MAC share would be the share of weights)."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(path))
    weights = {i.name for i in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in weights:
            continue
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.dim_value <= 0:
                d.dim_value = 1 if i == 0 else SYMBOLIC_SIDE
    model = shape_inference.infer_shapes(model)
    graph = model.graph
    producers = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    shapes: dict[str, list[int]] = {}
    for vi in list(graph.value_info) + list(graph.output) + list(graph.input):
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    return graph, producers, inits, shapes


def count_macs(path: str | Path) -> dict[str, Any]:
    """Multiply-accumulates of one inference (batch 1) of an ONNX model: Conv, ConvTranspose, MatMul, Gemm.

    Recorded in the bundle manifest (``compute``) at build time, so the torch/onnx-free runtime can project
    latency on devices (``fundus-edge bench``). Ops whose weight or output shape is unknown count 0 and are
    listed in ``uncounted``.
    """
    graph, producers, inits, shapes = _graph_facts(Path(path))
    total = 0.0
    by_op: Counter[str] = Counter()
    uncounted: list[str] = []
    for n in graph.node:
        if n.op_type not in _MAC_OPS:
            continue
        macs = _macs(n, shapes, inits, producers)
        if macs <= 0:
            uncounted.append(n.name or n.op_type)
        by_op[n.op_type] += int(macs)
        total += macs
    return {"macs": int(total), "by_op": dict(sorted(by_op.items())), "uncounted": uncounted,
            "counted_on": Path(path).name, "ops": list(_MAC_OPS)}


def summarize_qdq(path: Path, result: OnnxQuantResult) -> None:
    """Count ops, which compute ops run on quantized inputs, and the share of MACs that are int8."""
    graph, producers, inits, shapes = _graph_facts(path)
    counts: Counter[str] = Counter(n.op_type for n in graph.node)
    quantized: Counter[str] = Counter()
    floating: Counter[str] = Counter()
    macs_q = macs_f = 0.0
    for n in graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        is_q = _from_dq(n.input[0] if n.input else "", producers)
        if n.op_type in _MAC_OPS and len(n.input) > 1:
            is_q = is_q and _from_dq(n.input[1], producers)
        (quantized if is_q else floating)[n.op_type] += 1
        if n.op_type in _MAC_OPS:
            macs = _macs(n, shapes, inits, producers)
            if is_q:
                macs_q += macs
            else:
                macs_f += macs
    result.op_counts = dict(sorted(counts.items()))
    result.quantized_ops = dict(sorted(quantized.items()))
    result.float_ops = dict(sorted(floating.items()))
    result.int8_mac_fraction = macs_q / (macs_q + macs_f) if macs_q + macs_f else 0.0


def _from_dq(name: str, producers: dict[str, Any]) -> bool:
    src = producers.get(name)
    return src is not None and src.op_type == "DequantizeLinear"


def _weight_shape(name: str, inits: dict[str, Any], producers: dict[str, Any]) -> list[int] | None:
    if name in inits:
        return list(inits[name].dims)
    p = producers.get(name)
    if p is not None and p.op_type == "DequantizeLinear" and p.input[0] in inits:
        return list(inits[p.input[0]].dims)
    return None


def _macs(node: Any, shapes: dict[str, list[int]], inits: dict[str, Any], producers: dict[str, Any]) -> float:
    w = _weight_shape(node.input[1], inits, producers) if len(node.input) > 1 else None
    out = shapes.get(node.output[0])
    if w is None or out is None:
        return 0.0
    if node.op_type in ("Conv", "ConvTranspose"):
        # out: N, Cout, H, W ; w: Cout, Cin/g, kh, kw
        spatial = float(np.prod(out[2:])) if len(out) > 2 else 1.0
        return float(np.prod(w)) * spatial
    # MatMul / Gemm: rows of output x weight elements
    rows = float(np.prod(out[:-1])) if len(out) > 1 else 1.0
    return float(np.prod(w)) * rows
