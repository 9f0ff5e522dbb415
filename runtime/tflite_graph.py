"""What a .tflite graph computes in: integer coverage of a quantized model, read from the file itself.

A "full-integer" model that is not gets noticed here: every operator is classified by the dtypes of the
tensors it reads and writes (float32/float16 anywhere: a float op), QUANTIZE/DEQUANTIZE ops between float
and integer are conversions (at the graph's I/O they are expected in a float-I/O model; inside the graph
they mark a float island), and the multiply-accumulates of CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED
are counted to give the share of MACs in integer arithmetic. Torch-free: it needs only a TFLite interpreter.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UsageError
from .backends.litert import import_interpreter

_FLOAT_KINDS = "f"
_CONVERSIONS = ("QUANTIZE", "DEQUANTIZE")


@dataclass
class TfliteGraphReport:
    """Operator classes of one .tflite file. Truthy when the model computes in integers only."""

    path: str
    op_counts: dict[str, int] = field(default_factory=dict)
    integer_ops: dict[str, int] = field(default_factory=dict)
    float_ops: dict[str, int] = field(default_factory=dict)
    io_conversions: int = 0  # float<->integer QUANTIZE/DEQUANTIZE at the graph's inputs/outputs
    inner_conversions: int = 0  # the same inside the graph: float islands
    integer_macs: int = 0
    float_macs: int = 0
    input_dtype: str = "float32"
    output_dtype: str = "float32"

    @property
    def int8_mac_fraction(self) -> float:
        total = self.integer_macs + self.float_macs
        return self.integer_macs / total if total else 0.0

    @property
    def full_integer(self) -> bool:
        return not self.float_ops and self.inner_conversions == 0 and self.integer_macs > 0

    def __bool__(self) -> bool:
        return self.full_integer

    def to_dict(self) -> dict[str, Any]:
        return {"path": os.path.basename(self.path), "full_integer": self.full_integer,
                "op_counts": self.op_counts, "integer_ops": self.integer_ops, "float_ops": self.float_ops,
                "io_conversions": self.io_conversions, "inner_conversions": self.inner_conversions,
                "integer_macs": self.integer_macs, "float_macs": self.float_macs,
                "int8_mac_fraction": round(self.int8_mac_fraction, 4),
                "input_dtype": self.input_dtype, "output_dtype": self.output_dtype}

    def summary(self) -> str:
        n_int = sum(self.integer_ops.values())
        n_all = n_int + sum(self.float_ops.values())
        head = "full-integer" if self.full_integer else "NOT full-integer"
        floats = ", ".join(f"{k} x{v}" for k, v in sorted(self.float_ops.items())) or "none"
        return (f"{head}: {n_int}/{n_all} compute ops integer, {self.int8_mac_fraction:.1%} of MACs integer; "
                f"float ops: {floats}; conversions at I/O {self.io_conversions}, inside {self.inner_conversions}; "
                f"I/O {self.input_dtype} -> {self.output_dtype}")


def _macs(name: str, ins: list[dict[str, Any]], outs: list[dict[str, Any]]) -> int:
    if not outs or len(ins) < 2:
        return 0
    out = int(np.prod(outs[0]["shape"]))
    w = [int(d) for d in ins[1]["shape"]]
    if name == "CONV_2D" and len(w) == 4:
        return out * w[1] * w[2] * w[3]
    if name == "DEPTHWISE_CONV_2D" and len(w) == 4:
        return out * w[1] * w[2]
    if name == "FULLY_CONNECTED" and len(w) == 2:
        return out * w[1]
    return 0


def inspect_tflite(path: str | os.PathLike[str]) -> TfliteGraphReport:
    """Classify every operator of a .tflite file (the graph as stored: no delegate applied)."""
    api = import_interpreter("Inspecting a TFLite model")
    try:
        interp = api.create(str(path), 1, plain=True)
        interp.allocate_tensors()
    except ValueError as exc:
        raise UsageError(f"{path} is not a loadable TFLite model: {exc}") from exc
    if not hasattr(interp, "_get_ops_details"):
        raise UsageError(f"the TFLite interpreter from {api.module} cannot list operators; "
                         "install ai-edge-litert to inspect models")
    tensors = {int(t["index"]): t for t in interp.get_tensor_details()}
    graph_in = {int(d["index"]) for d in interp.get_input_details()}
    graph_out = {int(d["index"]) for d in interp.get_output_details()}
    report = TfliteGraphReport(str(path))
    report.input_dtype = np.dtype(interp.get_input_details()[0]["dtype"]).name
    report.output_dtype = np.dtype(interp.get_output_details()[0]["dtype"]).name
    counts: Counter[str] = Counter()
    integer: Counter[str] = Counter()
    floating: Counter[str] = Counter()
    for op in interp._get_ops_details():
        name = str(op["op_name"])
        counts[name] += 1
        ins = [tensors[int(i)] for i in op["inputs"] if int(i) >= 0]
        outs = [tensors[int(i)] for i in op["outputs"] if int(i) >= 0]
        kinds_in = {np.dtype(t["dtype"]).kind for t in ins}
        kinds_out = {np.dtype(t["dtype"]).kind for t in outs}
        is_float = _FLOAT_KINDS in kinds_in or _FLOAT_KINDS in kinds_out
        if name in _CONVERSIONS and is_float and (kinds_in | kinds_out) - {_FLOAT_KINDS}:
            at_io = (name == "QUANTIZE" and all(int(i) in graph_in for i in op["inputs"] if int(i) >= 0)) or (
                name == "DEQUANTIZE" and all(int(o) in graph_out for o in op["outputs"] if int(o) >= 0))
            if at_io:
                report.io_conversions += 1
            else:
                report.inner_conversions += 1
            continue
        macs = _macs(name, ins, outs)
        if is_float:
            floating[name] += 1
            report.float_macs += macs
        else:
            integer[name] += 1
            report.integer_macs += macs
    del interp
    report.op_counts, report.integer_ops, report.float_ops = dict(counts), dict(integer), dict(floating)
    return report
