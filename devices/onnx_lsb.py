"""The output quantization step (one LSB) of a QDQ ONNX model, read from the file without the onnx package.

A statically quantized model ends in ``DequantizeLinear(QuantizeLinear(x, s, zp), s, zp)``: every output value
is a multiple of ``s`` from the zero point, so two correct int8 engines may differ by one step where rounding
ties fall differently. The parity check needs ``s``; this module walks the protobuf wire format of ModelProto
just far enough to find it (graph outputs, nodes, initializers). ``runtime/`` and ``devices/`` never import onnx.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

# Field numbers from onnx.proto.
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_OUTPUT = 1, 5, 12
_NODE_INPUT, _NODE_OUTPUT, _NODE_OP_TYPE = 1, 2, 4
_VALUE_NAME = 1
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_FLOAT_DATA, _TENSOR_NAME, _TENSOR_RAW = 1, 2, 4, 8, 9
_FLOAT, _FLOAT16, _DOUBLE = 1, 10, 11
# Ops that move values without changing them: the LSB of their input is the LSB of their output.
_PASSTHROUGH = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose"}


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, object]]:
    """(field number, wire type, value) for each field of one message; value is int or bytes."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            v, i = _varint(buf, i)
            yield num, wt, v
        elif wt == 1:
            yield num, wt, buf[i : i + 8]
            i += 8
        elif wt == 2:
            ln, i = _varint(buf, i)
            yield num, wt, buf[i : i + ln]
            i += ln
        elif wt == 5:
            yield num, wt, buf[i : i + 4]
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")


def _scalar(tensor: bytes) -> float | None:
    dtype, raw = None, b""
    floats: list[float] = []
    dims: list[object] = []
    for num, wt, v in _fields(tensor):
        if num == _TENSOR_DATA_TYPE and isinstance(v, int):
            dtype = v
        elif num == _TENSOR_RAW and isinstance(v, bytes):
            raw = v
        elif num == _TENSOR_DIMS:
            dims.append(v)
        elif num == _TENSOR_FLOAT_DATA and isinstance(v, bytes):
            floats.extend(struct.unpack(f"<{len(v) // 4}f", v) if wt == 2 else struct.unpack("<f", v))
    if any(isinstance(d, int) and d != 1 for d in dims):
        return None  # per-channel output scale: no single LSB
    if dtype == _FLOAT:
        vals = list(struct.unpack(f"<{len(raw) // 4}f", raw)) if raw else floats
    elif dtype == _DOUBLE and raw:
        vals = list(struct.unpack(f"<{len(raw) // 8}d", raw))
    elif dtype == _FLOAT16 and raw:
        vals = list(struct.unpack(f"<{len(raw) // 2}e", raw))
    else:
        return None
    return float(vals[0]) if len(vals) == 1 else None


def _node(v: bytes) -> tuple[str, list[str], list[str]]:
    """A NodeProto's op type, inputs and outputs."""
    ins, outs, op = [], [], ""
    for n2, _, v2 in _fields(v):
        if not isinstance(v2, bytes):
            continue
        if n2 == _NODE_INPUT:
            ins.append(v2.decode())
        elif n2 == _NODE_OUTPUT:
            outs.append(v2.decode())
        elif n2 == _NODE_OP_TYPE:
            op = v2.decode()
    return op, ins, outs


def output_lsb(path: str | Path) -> float | None:
    """The quantization step of the model's first output, or None when it is not a quantized output."""
    data = Path(path).read_bytes()
    graph = next((v for num, _, v in _fields(data) if num == _MODEL_GRAPH and isinstance(v, bytes)), None)
    if graph is None:
        return None
    producers: dict[str, tuple[str, list[str]]] = {}
    initializers: dict[str, bytes] = {}
    outputs: list[str] = []
    for num, _, v in _fields(graph):
        if not isinstance(v, bytes):
            continue
        if num == _GRAPH_NODE:
            op, ins, outs = _node(v)
            for o in outs:
                producers[o] = (op, ins)
        elif num == _GRAPH_INITIALIZER:
            name = next((v2.decode() for n2, _, v2 in _fields(v) if n2 == _TENSOR_NAME and isinstance(v2, bytes)), "")
            initializers[name] = v
        elif num == _GRAPH_OUTPUT:
            outputs.extend(v2.decode() for n2, _, v2 in _fields(v) if n2 == _VALUE_NAME and isinstance(v2, bytes))
    if not outputs:
        return None
    name = outputs[0]
    for _ in range(16):
        op, ins = producers.get(name, ("", []))
        if op == "DequantizeLinear" and len(ins) >= 2 and ins[1] in initializers:
            return _scalar(initializers[ins[1]])
        if op in _PASSTHROUGH and ins:
            name = ins[0]
            continue
        return None
    return None
