"""Find ONNX tensors whose data lives in external files, from the model's bytes (no ``onnx`` package here).

onnxruntime, given a model as bytes, still reads a tensor's ``external_data`` from a path named inside the model,
relative to the current directory: bytes that were verified would then run with weights that were not. A bundle
model must carry its weights inside the verified file, so a model with any external tensor is refused.

The walk follows the ONNX schema (onnx.proto) through every place a tensor can sit: graph initializers and
sparse initializers, node attributes (tensors, sparse tensors, subgraphs), and model-local functions.
"""

from __future__ import annotations

from collections.abc import Iterator

from ...errors import BundleIntegrityError

# field numbers from onnx/onnx.proto
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_FUNCTION_NODE = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_GRAPHS, _ATTR_TENSORS, _ATTR_SPARSE, _ATTR_SPARSES = 5, 6, 10, 11, 22, 23
_SPARSE_VALUES, _SPARSE_INDICES = 1, 2
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_EXTERNAL = 1
_MAX_DEPTH = 64


class _Malformed(ValueError):
    pass


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise _Malformed("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i


def _fields(buf: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of one protobuf message; length-delimited values as bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield num, wire, value
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise _Malformed("truncated field")
            yield num, wire, buf[i:i + n]
            i += n
        else:
            raise _Malformed(f"wire type {wire}")
    if i != len(buf):
        raise _Malformed("truncated fixed-size field")


def _sub(buf: bytes, wanted: int) -> Iterator[bytes]:
    for num, wire, value in _fields(buf):
        if num == wanted and wire == 2 and isinstance(value, bytes):
            yield value


def _tensor_external(buf: bytes) -> bool:
    for num, wire, value in _fields(buf):
        if num == _TENSOR_EXTERNAL_DATA and wire == 2:
            return True
        if num == _TENSOR_DATA_LOCATION and wire == 0 and value == _EXTERNAL:
            return True
    return False


def _sparse_external(buf: bytes) -> bool:
    return any(_tensor_external(t) for f in (_SPARSE_VALUES, _SPARSE_INDICES) for t in _sub(buf, f))


def _node_external(buf: bytes, depth: int) -> bool:
    for attr in _sub(buf, _NODE_ATTRIBUTE):
        for num, wire, value in _fields(attr):
            if wire != 2 or not isinstance(value, bytes):
                continue
            if num in (_ATTR_T, _ATTR_TENSORS) and _tensor_external(value):
                return True
            if num in (_ATTR_SPARSE, _ATTR_SPARSES) and _sparse_external(value):
                return True
            if num in (_ATTR_G, _ATTR_GRAPHS) and _graph_external(value, depth + 1):
                return True
    return False


def _graph_external(buf: bytes, depth: int = 0) -> bool:
    if depth > _MAX_DEPTH:
        raise _Malformed("subgraphs nested too deeply")
    return (any(_tensor_external(t) for t in _sub(buf, _GRAPH_INITIALIZER))
            or any(_sparse_external(t) for t in _sub(buf, _GRAPH_SPARSE_INITIALIZER))
            or any(_node_external(n, depth) for n in _sub(buf, _GRAPH_NODE)))


def has_external_data(model: bytes) -> bool:
    """Whether any tensor of the ONNX model ``model`` (serialized ModelProto) keeps its data in another file.
    Raises ``ValueError`` when the bytes are not a well-formed protobuf message."""
    return (any(_graph_external(g) for g in _sub(model, _MODEL_GRAPH))
            or any(_node_external(n, 0) for f in _sub(model, _MODEL_FUNCTIONS) for n in _sub(f, _FUNCTION_NODE)))


def refuse_external_data(model: bytes, name: str) -> None:
    """Raise :class:`BundleIntegrityError` when ``model`` reads tensors from files outside the verified bytes."""
    try:
        external = has_external_data(model)
    except ValueError as exc:
        raise BundleIntegrityError(f"model {name} is not a well-formed ONNX file ({exc}); do not use this bundle") \
            from exc
    if external:
        raise BundleIntegrityError(
            f"model {name} keeps tensors in external data files, which are read outside the verified bundle; "
            "re-export the model with its weights inside the .onnx file (onnx.save_model(..., "
            "save_as_external_data=False))")
