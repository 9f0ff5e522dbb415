"""onnxruntime backend (CPU by default; providers from the settings, e.g. TensorRT -> CUDA -> CPU on Jetson)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ...errors import MissingDependencyError
from .base import Backend
from .onnx_scan import refuse_external_data

_LEVELS = {"disabled": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "all": "ORT_ENABLE_ALL"}


def import_onnxruntime() -> Any:
    """onnxruntime with its telemetry off (the package's ``__init__`` already set the variables that keep it from
    starting; ``disable_telemetry_events`` also stops the platform events where the build has them)."""
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    os.environ["ORT_TELEMETRY_DISABLED"] = "1"
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "onnx", "The ONNX backend") from exc
    disable = getattr(onnxruntime, "disable_telemetry_events", None)
    if callable(disable):
        disable()
    return onnxruntime


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def activate_impl(self) -> None:
        ort = import_onnxruntime()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.settings.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[self.settings.graph_optimization])
        opts.enable_cpu_mem_arena = self.settings.mem_arena
        opts.enable_mem_pattern = self.settings.mem_pattern
        if self.settings.allow_spinning is not None:
            opts.add_session_config_entry("session.intra_op.allow_spinning",
                                          "1" if self.settings.allow_spinning else "0")
        # x86 without VNNI (AVX2, AVX-512 before VNNI) multiplies u8 x s8 with int16 pair sums that can saturate:
        # results then differ from the exact int8 arithmetic of the device (ARM NEON) and of VNNI CPUs (measured
        # here on an AVX2-only AMD EPYC: up to 11 output LSB against the emulated Pi 4). This makes onnxruntime use
        # the exact u8u8 path on such CPUs only (no effect elsewhere), so the gate measures what the device computes.
        opts.add_session_config_entry("session.x64quantprecision", "1")
        opts.log_severity_level = 3
        self.session_options = opts
        available = ort.get_available_providers()
        wanted = [p for p in self.settings.providers if p in available] or ["CPUExecutionProvider"]
        if self.model_bytes is not None:
            refuse_external_data(self.model_bytes, self.model_path.name)
        model: bytes | str = self.model_bytes if self.model_bytes is not None else str(self.model_path)
        self._session = ort.InferenceSession(model, sess_options=opts, providers=wanted)
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        self.providers = self._session.get_providers()

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        out = self._session.run([self._output], {self._input: batch})[0]
        return np.asarray(out, dtype=np.float32)

    def deactivate_impl(self) -> None:
        del self._session
