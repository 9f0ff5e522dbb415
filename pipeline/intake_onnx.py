"""The ONNX-file model stage: ``build --model model.onnx`` with no torch installed. The brought fp32 file is
inspected (one float image input, NCHW or NHWC, fixed square or dynamic size, batch 1 or dynamic; not already
quantized), its output probed through onnxruntime and checked against the classification contract, and it
becomes the reference artifact unchanged. Needs the ``[quantize]`` extra (onnx, onnxruntime, sympy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import OutputContractError
from .config import BuildConfig
from .formats import FormatSpec
from .intake_file import check_file_request, classifier_only, file_preprocessing, reference_copy_stage
from .progress import Progress
from .stages import Exported, ModelInfo, classes_for

NEEDS = (("onnx", "onnx", "quantize"), ("onnxruntime", "onnxruntime", "quantize"))
NEEDS_INT8 = (("sympy", "sympy", "quantize"),)  # onnxruntime's quantization pre-processing


class OnnxFileStage:
    kind = "onnx"
    reference_format = "onnx"

    def check(self, cfg: BuildConfig) -> None:
        check_file_request(cfg, self.kind, NEEDS + (NEEDS_INT8 if "int8" in cfg.precisions else ()))

    def load(self, cfg: BuildConfig, progress: Progress) -> ModelInfo:
        from ..export.onnx_file import inspect_onnx, probe_onnx

        progress.stage(f"reading ONNX model {cfg.model} (no PyTorch: the file is the fp32 reference)")
        info = inspect_onnx(Path(cfg.model))
        spec = file_preprocessing(cfg, info.layout, info.size, info.path.name)
        try:
            n_out = probe_onnx(info, spec.size).num_outputs
        except OutputContractError as exc:
            raise classifier_only(exc, info.path.name) from exc
        class_names, positive = classes_for(cfg, {}, n_out, cfg.num_classes)
        facts = info.to_dict()
        progress.say(f"{info.path.name}: input {info.input_name!r} {info.layout} {spec.size}x{spec.size} "
                     f"(batch {info.fixed_batch or 'dynamic'}), {n_out} outputs, referable classes {positive}, "
                     f"opset {info.opset}, producer {info.producer} ({progress.seconds()})")
        return ModelInfo(None, str(info.path), None, {}, spec, n_out, class_names, positive, kind=self.kind,
                         input_name=info.input_name, output_name=info.output_name, source_file=facts)

    def export(self, fmt: FormatSpec, cfg: BuildConfig, model: ModelInfo, parity_x: np.ndarray, staging: Path,
               progress: Progress) -> Exported:
        from ..export.onnx_file import inspect_onnx, with_fixed_size
        from ..quantization.quantize_onnx import count_macs

        exported = reference_copy_stage(fmt, cfg, model, parity_x, staging, progress)
        shipped = staging / exported.artifact.path
        counted = with_fixed_size(inspect_onnx(shipped), model.spec.size, staging / "macs.onnx")
        compute = {**count_macs(counted), "counted_on": shipped.name, "input_size": model.spec.size}
        if counted != shipped:
            counted.unlink()
        return Exported(exported.fmt, exported.artifact, exported.info, compute)
