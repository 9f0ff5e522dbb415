"""PyTorch -> TFLite fp32 with litert-torch (no TensorFlow needed).

The graph has a fixed batch of 1 (the device screens one photograph at a time). ``layout="NHWC"`` wraps an
NCHW model with ``litert_torch.to_channel_last_io`` so that the file takes channels-last input, which is what
TFLite kernels compute in: no transpose at the input.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError, MissingDependencyError, UsageError

LAYOUTS = ("NHWC", "NCHW")


@dataclass(frozen=True)
class TfliteExport:
    path: Path
    layout: str  # the file's input layout
    model_layout: str  # the PyTorch model's input layout
    converter: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path.name, "converter": self.converter, "layout": self.layout,
                "model_layout": self.model_layout, "batch": 1, "seconds": round(self.seconds, 2)}


def import_litert_torch() -> Any:
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")  # our own progress lines go to stderr
    try:
        import litert_torch
    except ImportError as exc:
        raise MissingDependencyError("litert-torch", "export", "TFLite export") from exc
    return litert_torch


@contextlib.contextmanager
def _captured_output() -> Iterator[Any]:
    """Capture Python *and* native (absl/XNNPACK) stdout/stderr of the converter; yields a tail reader."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    py = io.StringIO()
    with tempfile.TemporaryFile() as tmp:
        def tail() -> str:
            tmp.seek(0)
            return (tmp.read().decode(errors="replace") + py.getvalue())[-2000:]

        try:
            os.dup2(tmp.fileno(), 1)
            os.dup2(tmp.fileno(), 2)
            with contextlib.redirect_stdout(py), contextlib.redirect_stderr(py):
                yield tail
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def export_tflite(module: nn.Module, out: Path, size: int, model_layout: str = "NCHW",
                  layout: str = "NHWC", channels: int = 3) -> TfliteExport:
    """Convert ``module`` (eval mode; input ``model_layout``, ``channels`` input channels) to a .tflite file
    whose input is ``layout`` at a fixed ``size`` x ``size`` (a dense model: its tile)."""
    if layout not in LAYOUTS or model_layout not in LAYOUTS:
        raise UsageError(f"TFLite layouts are {LAYOUTS}; got {layout!r} for a {model_layout!r} model")
    if model_layout == "NHWC" and layout == "NCHW":
        raise UsageError("the model takes NHWC input; a channels-first TFLite file of it is not supported "
                         "(use --tflite-layout NHWC)")
    shape = (1, channels, size, size) if layout == "NCHW" else (1, size, size, channels)
    example = torch.zeros(shape, dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with _captured_output() as tail:  # importing litert_torch already logs (absl, oneDNN, torch)
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                litert_torch = import_litert_torch()
                module = module.eval()
                if model_layout == "NCHW" and layout == "NHWC":
                    # The wrapper comes back in training mode (a fresh nn.Module): eval(), or BatchNorm would
                    # normalise with batch statistics.
                    module = litert_torch.to_channel_last_io(module, args=[0]).eval()
                edge_model = litert_torch.convert(module, (example,))
                edge_model.export(str(out))
        except MissingDependencyError:
            raise
        except Exception as exc:
            raise ExportError(f"TFLite export (litert-torch) failed: {type(exc).__name__}: {exc}\n"
                              f"converter output (tail):\n{tail()}") from exc
    if not out.is_file() or out.stat().st_size == 0:
        raise ExportError(f"litert-torch wrote no model to {out}")
    return TfliteExport(out, layout, model_layout, f"litert-torch {litert_torch.__version__}",
                        time.perf_counter() - t0)
