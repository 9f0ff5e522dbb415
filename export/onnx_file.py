"""An fp32 ONNX file brought as the model (exported from Keras/TF with tf2onnx, by another team, by a vendor):
what its image input is, that it is a float model (an already-quantized file cannot be the reference), and its
probed output checked against the output contract. Needs ``onnx`` and ``onnxruntime``; never torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle.read import sha256_file
from ..errors import MissingDependencyError, ModelLoadError, QuantizedReferenceError, UsageError
from .contract import OutputContract, check_output

# Ops that only a quantized graph holds (QDQ, QOperator and integer-arithmetic forms).
QUANTIZED_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger",
                           "MatMulInteger", "QGemm", "QAttention", "DynamicQuantizeMatMul", "MatMulNBits"})
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(bfloat16)": "bfloat16", "tensor(int64)": "int64", "tensor(int32)": "int32",
               "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(bool)": "bool"}
PROBE_SIZE = 224  # a probe side for a file with dynamic height and width and no --input-size


@dataclass(frozen=True)
class OnnxFileInfo:
    """The facts of an ONNX model file the build relies on (recorded in the report and the manifest)."""

    path: Path
    sha256: str
    input_name: str
    output_name: str
    layout: str  # NCHW or NHWC, read from where the 3 channels are
    size: int | None  # the fixed square input side; None when height and width are dynamic
    fixed_batch: int | None  # 1 when the graph fixes its batch (the runtime feeds one image at a time)
    opset: int
    producer: str

    def to_dict(self) -> dict[str, Any]:
        return {"format": "onnx", "file": self.path.name, "sha256": self.sha256, "input": self.input_name,
                "output": self.output_name, "layout": self.layout, "size": self.size,
                "fixed_batch": self.fixed_batch, "opset": self.opset, "producer": self.producer}


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError("onnx", "quantize", "Building from an ONNX model file") from exc
    return onnx


def _dim(d: Any) -> int | None:
    return int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None


def refuse_quantized(graph: Any, name: str) -> None:
    """Raise :class:`QuantizedReferenceError` when ``graph`` is already quantized: quantization ops, or weights
    stored as 8-bit (or narrower) integers. The reference must be the float model the int8 one is gated against."""
    import onnx

    ops = sorted({n.op_type for n in graph.node if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear")})
    small_int = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    int_weights = [t.name for t in graph.initializer if t.data_type in small_int]
    if ops or int_weights:
        what = (f"quantization ops ({', '.join(ops)})" if ops else
                f"{len(int_weights)} integer weight tensor(s) (e.g. {int_weights[0]})")
        raise QuantizedReferenceError(
            f"{name} is already quantized: it holds {what}. The reference of a build must be the float (fp32) "
            "model: the kit quantizes it itself and gates the int8 file against it. Pass the fp32 ONNX file the "
            "quantized one was made from (or ship this file as it is, outside fundus-edge build)")


def _image_input(model: Any, name: str) -> tuple[Any, list[int | None]]:
    """The one image input (graph inputs that are not initializers) and its dims."""
    inits = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelLoadError(f"{name} takes {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); fundus-edge "
                             "needs a model with one image input (N, 3, H, W) or (N, H, W, 3)")
    tt = inputs[0].type.tensor_type
    if tt.elem_type != 1:  # onnx.TensorProto.FLOAT
        import onnx

        raise ModelLoadError(f"{name}: input {inputs[0].name!r} is {onnx.TensorProto.DataType.Name(tt.elem_type)}; "
                             "the runtime feeds float32 images: export the model with a float32 input")
    dims = [_dim(d) for d in tt.shape.dim]
    if len(dims) != 4:
        raise ModelLoadError(f"{name}: input {inputs[0].name!r} has {len(dims)} axes; fundus-edge needs one image "
                             "input (N, 3, H, W) or (N, H, W, 3)")
    return inputs[0], dims


def image_layout(dims: list[int | None], name: str) -> tuple[str, int | None, int | None]:
    """(layout, fixed square side or None, fixed batch or None) of a 4-D image input."""
    if dims[1] == 3:
        layout, hw = "NCHW", (dims[2], dims[3])
    elif dims[3] == 3:
        layout, hw = "NHWC", (dims[1], dims[2])
    else:
        raise ModelLoadError(f"{name}: input shape {['?' if d is None else d for d in dims]} has no axis of 3 colour "
                             "channels at position 1 (NCHW) or 3 (NHWC); fundus-edge feeds RGB images")
    if (hw[0] is None) != (hw[1] is None) or (hw[0] is not None and hw[0] != hw[1]):
        raise ModelLoadError(f"{name}: input height x width is {hw[0] or '?'} x {hw[1] or '?'}; the kit's "
                             "preprocessing makes square images: export the model with a square input (or both "
                             "sides dynamic and --input-size)")
    batch = dims[0]
    if batch is not None and batch != 1:
        raise ModelLoadError(f"{name}: the input has a fixed batch of {batch}; the runtime feeds one image at a "
                             "time: export it with batch 1 or a dynamic batch")
    return layout, hw[0], batch


def inspect_onnx(path: Path) -> OnnxFileInfo:
    """Read an ONNX model file's input and check that it is a usable float reference. Raises
    :class:`ModelLoadError` (exit 5), :class:`QuantizedReferenceError` for an already-quantized file."""
    onnx = _import_onnx()
    name = path.name
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelLoadError(f"{path} is not a loadable ONNX file: {type(exc).__name__}: {exc}") from exc
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise ModelLoadError(f"{name} keeps its weights in external data files; a bundle ships one file: save it "
                             "with onnx.save_model(onnx.load(path), out, save_as_external_data=False)")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ModelLoadError(f"{name} does not pass onnx.checker: {exc}") from exc
    refuse_quantized(model.graph, name)
    inp, dims = _image_input(model, name)
    layout, size, batch = image_layout(dims, name)
    if not model.graph.output:
        raise ModelLoadError(f"{name} has no output")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    producer = " ".join(p for p in (model.producer_name, model.producer_version) if p)
    return OnnxFileInfo(path, sha256_file(path), inp.name, model.graph.output[0].name, layout, size, batch,
                        int(opset), producer or "unknown")


def probe_onnx(info: OnnxFileInfo, size: int, task: str = "classification") -> OutputContract:
    """Run zeros of the model's input shape through onnxruntime; check the first output against ``task``'s
    contract (the runtime reads the first output). Raises :class:`OutputContractError` (exit 5)."""
    from ..runtime.backends.onnxrt import import_onnxruntime

    if info.size is not None and size != info.size:
        raise UsageError(f"--input-size {size}, but {info.path.name} takes {info.size} x {info.size} images")
    ort = import_onnxruntime()
    shape = (1, 3, size, size) if info.layout == "NCHW" else (1, size, size, 3)
    try:
        sess = ort.InferenceSession(str(info.path), providers=["CPUExecutionProvider"])
        out = sess.run([info.output_name], {info.input_name: np.zeros(shape, np.float32)})[0]
    except Exception as exc:
        raise ModelLoadError(f"{info.path.name} does not run on a {shape} float32 input in onnxruntime: "
                             f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}") from exc
    dtype = _ORT_DTYPES.get(sess.get_outputs()[0].type, str(getattr(out, "dtype", "unknown")))
    return check_output(tuple(np.shape(out)), task, shape, info.layout, dtype)


def with_fixed_size(info: OnnxFileInfo, size: int, out: Path) -> Path:
    """A copy of the file whose image input has a fixed ``size`` x ``size`` (batch 1), for counting MACs by shape
    inference: a dynamic height and width would count as 1 pixel. Returns the file itself when already fixed."""
    if info.size is not None:
        return info.path
    onnx = _import_onnx()
    model = onnx.load(str(info.path))
    dims = next(i for i in model.graph.input if i.name == info.input_name).type.tensor_type.shape.dim
    for axis, value in zip((0, 2, 3) if info.layout == "NCHW" else (0, 1, 2), (1, size, size), strict=True):
        dims[axis].ClearField("dim_param")
        dims[axis].dim_value = value
    onnx.save(model, str(out))
    return out
