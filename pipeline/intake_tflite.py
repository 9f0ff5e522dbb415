"""The TFLite-file model stage: ``build --model model.tflite`` (float32, e.g. from the TFLite converter) with no
torch installed. The file is inspected (one float image input, NHWC or NCHW, one signature; not already
quantized), its output probed and checked against the classification contract, and it becomes the reference
artifact unchanged; the int8 file is the full-integer one the LiteRT Quantizer writes, gated against it. Needs
the ``[quantize-tflite]`` extra (litert-quantizer, ai-edge-litert)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import OutputContractError
from .config import BuildConfig
from .formats import FormatSpec
from .intake_file import check_file_request, classifier_only, file_preprocessing, reference_copy_stage
from .progress import Progress
from .stages import Exported, ModelInfo, classes_for

NEEDS = (("ai_edge_litert", "ai-edge-litert", "quantize-tflite"),)


class TfliteFileStage:
    kind = "tflite"
    reference_format = "tflite"

    def check(self, cfg: BuildConfig) -> None:  # the quantizer: format_tflite.check_config
        check_file_request(cfg, self.kind, NEEDS)

    def load(self, cfg: BuildConfig, progress: Progress) -> ModelInfo:
        from ..export.tflite_file import inspect_tflite_file, probe_tflite

        progress.stage(f"reading TFLite model {cfg.model} (no PyTorch: the file is the fp32 reference)")
        info, interp = inspect_tflite_file(Path(cfg.model))
        spec = file_preprocessing(cfg, info.layout, info.size, info.path.name)
        try:
            n_out = probe_tflite(info, interp, spec.size).num_outputs
        except OutputContractError as exc:
            raise classifier_only(exc, info.path.name) from exc
        class_names, positive = classes_for(cfg, {}, n_out, cfg.num_classes)
        progress.say(f"{info.path.name}: input {info.input_name!r} {info.layout} {spec.size}x{spec.size}, {n_out} "
                     f"outputs, referable classes {positive}, signature {info.signature!r} ({progress.seconds()})")
        return ModelInfo(None, str(info.path), None, {}, spec, n_out, class_names, positive, kind=self.kind,
                         input_name=info.input_name, output_name=info.output_name, source_file=info.to_dict())

    def export(self, fmt: FormatSpec, cfg: BuildConfig, model: ModelInfo, parity_x: np.ndarray, staging: Path,
               progress: Progress) -> Exported:
        return reference_copy_stage(fmt, cfg, model, parity_x, staging, progress)
