"""Validate an exported file against the PyTorch model it came from (after Optimum's validate_model_outputs).

The exported file runs through the *runtime's* backend, so what is validated is what ships.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from ..runtime.backends import BackendSettings, run_backend
from ..runtime.compare import CompareResult, Tolerance, compare_outputs

DEFAULT_EXPORT_TOLERANCE = Tolerance(atol=1e-3, min_top1_agreement=1.0, min_decision_agreement=1.0)


def torch_outputs(module: nn.Module, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    module.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(inputs), batch):
            outs.append(module(torch.from_numpy(np.ascontiguousarray(inputs[i : i + batch]))).float().numpy())
    return np.concatenate(outs).astype(np.float32)


def validate_export(module: nn.Module, fmt: str, path: Path, inputs: np.ndarray, positive_classes: list[int],
                    tolerance: Tolerance = DEFAULT_EXPORT_TOLERANCE, name: str = "export",
                    reference: np.ndarray | None = None) -> CompareResult:
    """Compare PyTorch with the exported file on ``inputs`` (N, ...); raises :class:`ExportError` on failure."""
    ref = torch_outputs(module, inputs) if reference is None else reference
    got, _ = run_backend(fmt, path, inputs, BackendSettings(threads=0))
    result = compare_outputs(ref, got, reference_name="pytorch", candidate_name=name, tolerance=tolerance,
                             positive_classes=positive_classes)
    if not result:
        raise ExportError(f"{name} disagrees with PyTorch: {'; '.join(result.failures)}. "
                          "Try the other exporter (--exporter), or raise the tolerance with --export-atol "
                          "if the difference is understood")
    return result
