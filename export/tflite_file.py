"""An fp32 TFLite file brought as the model (converted from Keras/TF with the TFLite converter): its image input,
that it is a float model (an int8, int16 or float16-quantized file cannot be the reference), one signature (the
quantizer calibrates through it), and its probed output checked against the output contract. Needs the LiteRT
interpreter (ai-edge-litert); never torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle.read import sha256_file
from ..errors import ModelLoadError, QuantizedReferenceError
from .contract import OutputContract, check_output
from .onnx_file import image_layout

QUANTIZED_DTYPES = ("int8", "uint8", "int16", "float16")


@dataclass(frozen=True)
class TfliteFileInfo:
    path: Path
    sha256: str
    input_name: str
    output_name: str
    layout: str
    size: int | None
    fixed_batch: int | None
    signature: str

    def to_dict(self) -> dict[str, Any]:
        return {"format": "tflite", "file": self.path.name, "sha256": self.sha256, "input": self.input_name,
                "output": self.output_name, "layout": self.layout, "size": self.size,
                "fixed_batch": self.fixed_batch, "signature": self.signature}


def _interpreter(path: Path) -> Any:
    from ..runtime.backends.litert import import_interpreter

    api = import_interpreter("Building from a TFLite model file")
    try:
        interp = api.create(str(path), 1, plain=True)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{path} is not a loadable TFLite model: {exc}") from exc
    return interp


def refuse_quantized_tflite(interp: Any, name: str) -> None:
    """Raise :class:`QuantizedReferenceError` when the file holds quantized tensors (int8/uint8/int16 with a
    scale, or float16 weights): the reference must be the float32 model."""
    found = []
    for t in interp.get_tensor_details():
        dtype = np.dtype(t["dtype"]).name
        scales = np.asarray((t.get("quantization_parameters") or {}).get("scales", []))
        if dtype == "float16" or (dtype in QUANTIZED_DTYPES and (scales.size or t.get("quantization", (0,))[0])):
            found.append(f"{t['name']} ({dtype})")
    if found:
        raise QuantizedReferenceError(
            f"{name} is already quantized: {len(found)} quantized tensor(s), e.g. {', '.join(found[:3])}. The "
            "reference of a build must be the float32 model: the kit quantizes it itself and gates the int8 file "
            "against it. Pass the float .tflite the converter wrote without optimizations "
            "(converter.optimizations unset)")


def inspect_tflite_file(path: Path) -> tuple[TfliteFileInfo, Any]:
    """The facts of a float .tflite file and its interpreter. Raises :class:`ModelLoadError` (exit 5),
    :class:`QuantizedReferenceError` for an already-quantized file."""
    name = path.name
    interp = _interpreter(path)
    refuse_quantized_tflite(interp, name)
    ins, outs = interp.get_input_details(), interp.get_output_details()
    if len(ins) != 1 or len(outs) != 1:
        raise ModelLoadError(f"{name} has {len(ins)} inputs and {len(outs)} outputs; fundus-edge needs one image "
                             "input and one output (class logits)")
    if np.dtype(ins[0]["dtype"]) != np.float32:
        raise ModelLoadError(f"{name}: input is {np.dtype(ins[0]['dtype']).name}; the reference takes float32 "
                             "images")
    sig = ins[0].get("shape_signature")
    dims = [int(d) if int(d) > 0 else None for d in (sig if sig is not None and len(sig) else ins[0]["shape"])]
    if len(dims) != 4:
        raise ModelLoadError(f"{name}: input has {len(dims)} axes; fundus-edge needs (N, H, W, 3) or (N, 3, H, W)")
    layout, size, batch = image_layout(dims, name)
    signatures = interp.get_signature_list()
    if len(signatures) != 1:
        raise ModelLoadError(f"{name} has {len(signatures)} signatures; the int8 calibration runs through exactly "
                             "one: convert with tf.lite.TFLiteConverter.from_saved_model (it writes "
                             "'serving_default')")
    return TfliteFileInfo(path, sha256_file(path), str(ins[0]["name"]), str(outs[0]["name"]), layout, size, batch,
                          next(iter(signatures))), interp


def probe_tflite(info: TfliteFileInfo, interp: Any, size: int, task: str = "classification") -> OutputContract:
    """One forward pass on zeros; the output's shape and dtype checked against ``task``'s contract."""
    shape = (1, 3, size, size) if info.layout == "NCHW" else (1, size, size, 3)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    try:
        if tuple(int(d) for d in inp["shape"]) != shape:
            interp.resize_tensor_input(inp["index"], list(shape))
            interp.allocate_tensors()
        interp.set_tensor(inp["index"], np.zeros(shape, np.float32))
        interp.invoke()
        y = interp.get_tensor(out["index"])
    except (ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"{info.path.name} does not run on a {shape} float32 input: {exc}") from exc
    return check_output(tuple(y.shape), task, shape, info.layout, np.dtype(y.dtype).name)
