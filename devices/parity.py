"""x86 vs emulated-Arm parity of one artifact, with the runtime's comparator (runtime/compare.py).

Tolerances: fp32 artifacts agree within ``rtol`` (1e-5) of the largest output magnitude; int8 artifacts whose
output is quantized agree within one output LSB (two correct integer engines may round a tie differently);
referral decisions must be identical for every image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.compare import CompareResult, Tolerance, compare_outputs

FP32_RTOL = 1e-5
INT8_LSBS = 1.0


def output_lsb(fmt: str, path: Path) -> float | None:
    """One output quantization step of an artifact file (None: not a quantized output, or unknown)."""
    if fmt == "onnx":
        from .onnx_lsb import output_lsb as onnx_output_lsb

        return onnx_output_lsb(path)
    if fmt == "tflite":
        return tflite_output_lsb(path)
    return None


def tflite_output_lsb(path: Path) -> float | None:
    """The scale of a .tflite model's output: the output tensor's own when it is int8/uint8, else that of the
    quantized tensor its final DEQUANTIZE (through reshapes) reads. Needs a LiteRT interpreter on the host."""
    interpreter: Any = None
    for module in ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"):
        try:
            interpreter = __import__(module, fromlist=["Interpreter"]).Interpreter
            break
        except ImportError:
            continue
    if interpreter is None:
        return None
    it = interpreter(model_path=str(path))
    out = it.get_output_details()[0]
    if np.dtype(out["dtype"]).kind in "iu":
        return float(out["quantization"][0]) or None
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    try:
        ops = it._get_ops_details()  # not public API: without it the LSB is unknown (stricter tolerance)
    except AttributeError:
        return None
    index = int(out["index"])
    for _ in range(16):
        op = next((o for o in ops if index in [int(i) for i in o["outputs"]]), None)
        if op is None or not len(op["inputs"]):
            return None
        if op["op_name"] == "DEQUANTIZE":
            scale = tensors.get(int(op["inputs"][0]), {}).get("quantization", (0.0, 0))[0]
            return float(scale) or None
        if op["op_name"] not in ("RESHAPE", "SQUEEZE"):
            return None
        index = int(op["inputs"][0])
    return None


@dataclass(frozen=True)
class Parity:
    artifact: str
    precision: str
    compare: CompareResult
    rule: str  # the tolerance in words
    lsb: float | None
    max_lsb: float | None  # max |difference| in output LSBs
    inputs_identical: int  # images whose preprocessed tensor was bit-identical on both machines
    n: int
    errors_agree: bool  # the same images failed (with the same codes) on both sides

    def __bool__(self) -> bool:
        return bool(self.compare) and self.errors_agree

    @property
    def passed(self) -> bool:
        return bool(self)

    @property
    def failures(self) -> tuple[str, ...]:
        return self.compare.failures

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "precision": self.precision, "passed": self.passed, "rule": self.rule,
                "lsb": self.lsb, "max_lsb": self.max_lsb, "inputs_identical": self.inputs_identical, "n": self.n,
                "errors_agree": self.errors_agree, "compare": self.compare.to_dict()}

    def row(self) -> str:
        c = self.compare
        diff = f"{c.max_abs:.2e}" + (f" ({self.max_lsb:.2f} LSB)" if self.max_lsb is not None else "")
        return (f"{self.artifact:<12} {self.precision:<5} n={c.n:<4} max|d|={diff:<22} "
                f"inputs identical {self.inputs_identical}/{self.n}  decisions {c.decision_agreement:.3f}  "
                f"{self.rule:<22} {'PASS' if self else 'FAIL'}")


def parity(artifact: str, precision: str, host: np.ndarray, emulated: np.ndarray, host_results: list[dict[str, Any]],
           emu_results: list[dict[str, Any]], positive_classes: list[int], threshold: float,
           lsb: float | None, emulated_name: str = "arm64") -> Parity:
    """Compare the outputs of one artifact on the host and on the emulated device (rows of failed images dropped)."""
    ok = np.all(np.isfinite(host), axis=1) & np.all(np.isfinite(emulated), axis=1)
    a, b = host[ok], emulated[ok]
    scale = float(np.max(np.abs(a))) if a.size else 1.0
    if precision == "int8" and lsb:
        atol = INT8_LSBS * lsb * (1 + 1e-4)  # float32 dequantization rounding
        rule = f"<= {INT8_LSBS:g} LSB ({lsb:.3g})"
    else:
        atol = FP32_RTOL * max(1.0, scale)
        rule = f"rtol {FP32_RTOL:g}" if precision != "int8" else f"rtol {FP32_RTOL:g} (LSB unknown)"
    tol = Tolerance(atol=atol, min_top1_agreement=0.0 if precision == "int8" else 1.0, min_decision_agreement=1.0)
    if a.size:
        cmp = compare_outputs(a, b, reference_name="x86_64", candidate_name=emulated_name, tolerance=tol,
                              positive_classes=positive_classes, threshold=threshold)
    else:
        cmp = CompareResult("x86_64", emulated_name, 0, 0.0, 0.0, 0.0, 1.0, 1.0, tol, ("no image was screened",))
    max_lsb = float(np.max(np.abs(a - b)) / lsb) if (lsb and a.size) else None
    same_len = len(host_results) == len(emu_results)
    pairs = list(zip(host_results, emu_results, strict=False))
    same_inputs = sum(1 for h, e in pairs if h.get("input_sha256") and h.get("input_sha256") == e.get("input_sha256"))
    errors_agree = same_len and all((h.get("error") or {}).get("code") == (e.get("error") or {}).get("code")
                                    for h, e in pairs)
    return Parity(artifact, precision, cmp, rule, lsb, max_lsb, same_inputs, len(host_results), errors_agree)
