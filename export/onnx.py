"""PyTorch -> ONNX with ``torch.onnx.export(dynamo=True)`` (onnxscript); the legacy TorchScript exporter is
available as an explicit option, never a silent fallback."""

from __future__ import annotations

import contextlib
import io
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ExportError, MissingDependencyError
from .contract import INPUT_NAME, OUTPUT_NAME
from .load import ExportedProgramModule

EXPORTERS = ("dynamo", "legacy")


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    exporter: str
    opset: int
    seconds: float
    fixed_batch: int | None = None  # 1 when the graph fixes its batch (fine: the runtime feeds one image at a time)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path.name, "exporter": self.exporter, "opset": self.opset,
                "seconds": round(self.seconds, 2), "fixed_batch": self.fixed_batch}


def _legacy_axes(dynamic_hw: bool, layout: str) -> dict[str, dict[int, str]]:
    axes = {0: "batch"}
    if dynamic_hw:
        axes.update({2: "height", 3: "width"} if layout == "NCHW" else {1: "height", 2: "width"})
    return {INPUT_NAME: axes, OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}}


def export_onnx(module: nn.Module, out: Path, size: int, layout: str = "NCHW", exporter: str = "dynamo",
                opset: int | None = None, channels: int = 3, dynamic_hw: bool = False) -> OnnxExport:
    """Export ``module`` (eval mode) with a dynamic batch axis to a single self-contained .onnx file.

    ``channels``: input channels (3 for classifiers; 1 for grey vessel models). ``dynamic_hw``: height and
    width are dynamic too (dense models run on tiles or whole images of any multiple of their stride).

    A ``torch.export`` program (:class:`ExportedProgramModule`) is re-traced without its input guards, so that
    a program exported with a fixed batch still gives a file with a dynamic batch axis.
    """
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependencyError("onnx", "export", "ONNX export") from exc
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {EXPORTERS}")
    is_program = isinstance(module, ExportedProgramModule)
    module = module.exportable() if isinstance(module, ExportedProgramModule) else module.eval()
    shape = (1, channels, size, size) if layout == "NCHW" else (1, size, size, channels)
    example = torch.zeros(shape, dtype=torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            if exporter == "dynamo":
                try:
                    import onnxscript  # noqa: F401
                except ImportError as exc:
                    raise MissingDependencyError("onnxscript", "export", "The dynamo ONNX exporter") from exc
                batch = torch.export.Dim("batch", min=1, max=1024)
                dims: dict[int, Any] = {0: batch}
                if dynamic_hw:  # sides are multiples of 16 (the U-Net's stride); 16 * 512 = 8192 px at most
                    hw = (2, 3) if layout == "NCHW" else (1, 2)
                    dims.update({hw[0]: 16 * torch.export.Dim("h16", min=1, max=512),
                                 hw[1]: 16 * torch.export.Dim("w16", min=1, max=512)})
                program = torch.onnx.export(
                    module, (example,), None, dynamo=True, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME], dynamic_shapes=(dims,),
                    opset_version=opset, optimize=True, verbose=False,
                )
                if program is None:
                    raise ExportError("torch.onnx.export returned no program")
                program.save(str(out), external_data=False)
            else:
                torch.onnx.export(
                    module, (example,), str(out), dynamo=False, input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME], dynamic_axes=_legacy_axes(dynamic_hw, layout),
                    opset_version=opset or 17,
                )
    except (ExportError, MissingDependencyError):
        raise
    except Exception as exc:
        hint = (" Try --exporter legacy." if exporter == "dynamo" else
                " A torch.export (.pt2) program exports with --exporter dynamo (the default)." if is_program else "")
        raise ExportError(f"ONNX export ({exporter}) failed: {type(exc).__name__}: {exc}.{hint}") from exc
    model = onnx.load(str(out))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported ONNX model does not pass onnx.checker: {exc}") from exc
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    fixed = batch_dim.dim_value if batch_dim.HasField("dim_value") else None
    if fixed is not None and fixed != 1:
        raise ExportError(
            f"the exported ONNX model has a fixed batch of {fixed} (the model's code fixes it, e.g. x.view({fixed}, "
            "-1) or a reshape to a constant shape); the runtime feeds one image at a time: use x.flatten(1) / "
            "x.view(x.shape[0], -1)" + (" or try --exporter legacy" if exporter == "dynamo" else ""))
    opset_used = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxExport(out, exporter, int(opset_used), time.perf_counter() - t0, fixed)
