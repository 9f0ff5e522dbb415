"""LiteRT (TFLite) backend: XNNPACK on CPU, quantized (int8/uint8) I/O scaled from the tensors' own parameters.

The interpreter comes from the first of these that imports:

1. ``ai_edge_litert.interpreter`` (the ``[litert]`` extra; numpy 2, Python 3.10+),
2. ``tflite_runtime.interpreter`` (the legacy wheel; 2.14 needs numpy < 2 and Python <= 3.11),
3. ``tensorflow.lite`` (development machines that have TensorFlow anyway).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import RuntimeMissingError, UsageError
from .base import Backend

# (module to import, distribution that provides it); tried in this order.
INTERPRETER_MODULES: tuple[tuple[str, str], ...] = (
    ("ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime.interpreter", "tflite-runtime"),
    ("tensorflow.lite", "tensorflow"),
)


@dataclass(frozen=True)
class InterpreterApi:
    """The interpreter class and the module it came from."""

    module: str
    distribution: str
    interpreter: Any  # the Interpreter class
    op_resolver_type: Any  # the OpResolverType enum, or None when the package has none

    def create(self, model_path: str, threads: int | None, *, plain: bool = False,
               model_content: bytes | None = None) -> Any:
        """An interpreter for ``model_path`` (or for ``model_content``, the model's bytes, when given). ``plain``:
        builtin kernels, no default (XNNPACK) delegate."""
        kwargs: dict[str, Any] = ({"model_content": model_content} if model_content is not None
                                  else {"model_path": model_path})
        kwargs["num_threads"] = threads
        if plain and self.op_resolver_type is not None:
            kwargs["experimental_op_resolver_type"] = self.op_resolver_type.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        return self.interpreter(**kwargs)


def import_interpreter(purpose: str = "The TFLite (LiteRT) backend") -> InterpreterApi:
    """Import the first available TFLite interpreter (see the module docstring for the order)."""
    problems: list[str] = []
    for module_name, dist in INTERPRETER_MODULES:
        try:
            mod = importlib.import_module(module_name)
        except ImportError as exc:
            problems.append(f"{module_name} ({exc})")
            continue
        interpreter = getattr(mod, "Interpreter", None)
        if interpreter is None:
            problems.append(f"{module_name}: has no Interpreter")
            continue
        return InterpreterApi(module_name, dist, interpreter, getattr(mod, "OpResolverType", None))
    raise RuntimeMissingError("ai-edge-litert", "litert", purpose, problems,
                              "; or, on Python <= 3.11 with numpy < 2: pip install tflite-runtime")


@dataclass(frozen=True)
class TensorQuant:
    """Affine quantization of an I/O tensor: real = (q - zero_point) * scale. ``scale == 0``: a float tensor."""

    dtype: np.dtype[Any]
    scale: float
    zero_point: int

    @classmethod
    def from_details(cls, details: dict[str, Any]) -> TensorQuant:
        dtype = np.dtype(details["dtype"])
        params = details.get("quantization_parameters") or {}
        scales = np.asarray(params.get("scales", []))
        if scales.size > 1:
            raise UsageError(f"I/O tensor {details.get('name')!r} is quantized per channel; "
                             "the TFLite backend supports per-tensor I/O quantization only")
        scale, zero_point = details.get("quantization", (0.0, 0))
        if dtype.kind in "iu" and not scale:
            raise UsageError(f"I/O tensor {details.get('name')!r} is {dtype.name} without quantization "
                             "parameters; it cannot carry image data or logits")
        if dtype.kind not in "iuf":
            raise UsageError(f"I/O tensor {details.get('name')!r} has unsupported dtype {dtype.name}")
        return cls(dtype, float(scale), int(zero_point))

    @property
    def quantized(self) -> bool:
        return self.dtype.kind in "iu"

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """float32 -> this tensor's dtype (round half to even, saturating)."""
        if not self.quantized:
            return x.astype(self.dtype, copy=False)
        info = np.iinfo(self.dtype)
        q = np.rint(x / np.float32(self.scale)) + self.zero_point
        return np.clip(q, info.min, info.max).astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """this tensor's dtype -> float32."""
        if not self.quantized:
            return np.asarray(q, dtype=np.float32)
        return ((q.astype(np.int32) - self.zero_point) * np.float32(self.scale)).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype.name, "scale": self.scale, "zero_point": self.zero_point}


class LiteRTBackend(Backend):
    """One .tflite file. Takes float32 in the artifact's layout; int8/uint8 I/O is (de)quantized here."""

    name = "litert"

    def activate_impl(self) -> None:
        self.api = import_interpreter()
        threads = self.settings.threads or None  # 0: let the runtime decide
        try:
            self._interp = self.api.create(str(self.model_path), threads, model_content=self.model_bytes)
            self._interp.allocate_tensors()
        except ValueError as exc:
            raise UsageError(f"{self.model_path} is not a loadable TFLite model: {exc}") from exc
        inputs = self._interp.get_input_details()
        outputs = self._interp.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise UsageError(f"{self.model_path} has {len(inputs)} inputs and {len(outputs)} outputs; "
                             "a screening model has one image input and one output")
        self._in, self._out = inputs[0], outputs[0]
        self.input_quant = TensorQuant.from_details(self._in)
        self.output_quant = TensorQuant.from_details(self._out)
        self.input_shape = tuple(int(d) for d in self._in["shape"])
        self.io_dtype = self.input_quant.dtype.name

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        want = self.input_shape[1:]
        if batch.ndim != len(self.input_shape) or batch.shape[1:] != want:
            hint = ""
            if batch.ndim == 4 and sorted(batch.shape[1:]) == sorted(want):
                hint = (" — the same sizes in another order: the model wants "
                        f"{'NHWC' if want[-1] == 3 else 'NCHW'} input; check the artifact's layout")
            raise UsageError(f"{self.model_path.name} takes input (batch, {', '.join(map(str, want))}), "
                             f"got {tuple(batch.shape)}{hint}")
        outs = []
        for row in batch:  # the exported graph has a fixed batch of 1, as on the device
            self._interp.set_tensor(self._in["index"], self.input_quant.quantize(row[None]))
            self._interp.invoke()
            outs.append(self.output_quant.dequantize(self._interp.get_tensor(self._out["index"])))
        return np.concatenate(outs)

    def deactivate_impl(self) -> None:
        del self._interp
