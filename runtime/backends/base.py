"""The backend contract, after Polygraphy's runners: ``activate`` / ``infer`` / ``deactivate``.

The base class checks state and input, and times every call; subclasses implement ``*_impl``. The heavy
session is created in ``activate`` so that load time and inference time are measured apart.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np

from ...errors import FundusEdgeError, UsageError

# inference threads one process may ask for: more than any supported device has cores, few enough that a typo
# (--threads 100000) cannot exhaust the machine
MAX_THREADS = 64


@dataclass(frozen=True)
class BackendSettings:
    """Runtime knobs that come from the device profile or the command line, never from the model."""

    threads: int = 1
    providers: tuple[str, ...] = ()
    # onnxruntime session options; the defaults are what benchmarks/ort_options.py measured best (README, Speed)
    graph_optimization: str = "all"  # "disabled" | "basic" | "extended" | "all"
    mem_arena: bool = True  # enable_cpu_mem_arena
    mem_pattern: bool = True  # enable_mem_pattern
    # session.intra_op.allow_spinning: None leaves onnxruntime's default (spin), False stops idle intra-op threads
    # from spinning (they then leave the cores to decoding, the pipeline's worker and other processes)
    allow_spinning: bool | None = None

    def __post_init__(self) -> None:
        if self.threads < 0:
            raise UsageError(f"threads must be >= 0 (0 lets the backend decide), got {self.threads}")
        if self.threads > MAX_THREADS:
            raise UsageError(f"threads must be at most {MAX_THREADS} (a handheld has a few cores), got {self.threads}")
        if self.graph_optimization not in ("disabled", "basic", "extended", "all"):
            raise UsageError(f"graph_optimization must be disabled, basic, extended or all, got "
                             f"{self.graph_optimization!r}")


@dataclass
class BackendTimings:
    load_ms: float = 0.0
    infer_ms: list[float] = field(default_factory=list)


class Backend(ABC):
    """One model file, one inference engine. Use as a context manager or call activate/deactivate."""

    name = "backend"

    def __init__(self, model_path: str | Path, settings: BackendSettings | None = None,
                 model_bytes: bytes | None = None) -> None:
        self.model_path = Path(model_path)
        # The verified bytes of the model (Bundle.read_artifact): when given, the engine is built from these and
        # the path is only a name for messages; it is never opened again after verification.
        self.model_bytes = model_bytes
        self.settings = settings or BackendSettings()
        self.timings = BackendTimings()
        self._active = False

    @property
    def is_active(self) -> bool:
        return self._active

    def activate(self) -> None:
        if self._active:
            return
        if self.model_bytes is None and not self.model_path.is_file():
            raise FundusEdgeError(f"model file {self.model_path} does not exist")
        t0 = time.perf_counter()
        self.activate_impl()
        self.timings.load_ms = (time.perf_counter() - t0) * 1e3
        self._active = True

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Run the model on a float32 batch laid out as the artifact expects; returns float32 outputs."""
        if not self._active:
            raise FundusEdgeError(f"{self.name} backend is not active; call activate() first")
        if batch.dtype != np.float32:
            raise UsageError(f"{self.name} backend takes float32 input, got {batch.dtype}")
        t0 = time.perf_counter()
        out = self.infer_impl(batch)
        self.timings.infer_ms.append((time.perf_counter() - t0) * 1e3)
        return out

    def deactivate(self) -> None:
        if self._active:
            self.deactivate_impl()
            self._active = False

    def __enter__(self) -> Backend:
        self.activate()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.deactivate()

    @abstractmethod
    def activate_impl(self) -> None: ...

    @abstractmethod
    def infer_impl(self, batch: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def deactivate_impl(self) -> None: ...
