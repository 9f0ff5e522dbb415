"""What ``fundus-edge build`` is asked to do (:class:`BuildConfig`) and what it returns (:class:`BuildResult`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..gate.gate import GateCriteria
from ..gate.segmentation import SegmentationCriteria
from ..quantization.fallback import FallbackBudget
from ..runtime.dense import DensePreprocessSpec
from ..runtime.preprocess import PreprocessSpec
from ..runtime.quality import QualitySpec

FORMATS = ("onnx", "tflite")  # the default; every name must be in pipeline/formats.py's registry


@dataclass
class BuildConfig:
    model: str  # path, or "reference:<name>"
    out: Path
    # "classification", "segmentation", or "auto" (the checkpoint's task, else the probed output's; see task.py)
    task: str = "classification"
    calib: Path | None = None
    val: Path | None = None
    val_images: Path | None = None
    # what the validation photos are, for the report's verdict header ("IDRiD test + HRF, real photographs");
    # val_synthetic: True for synthetic pictures, False for real photographs, None when not said
    val_description: str | None = None
    val_synthetic: bool | None = None
    arch: str | None = None
    num_classes: int | None = None
    name: str | None = None
    class_names: list[str] | None = None
    positive_classes: list[int] | None = None
    referable_from: int = 2
    preprocessing: PreprocessSpec | None = None
    # PreprocessSpec fields set on the command line (--input-size, --mean, --std ...), applied on top of the
    # checkpoint's recorded preprocessing; for a brought .onnx/.tflite file they define it (with its input layout)
    preprocess_overrides: dict[str, Any] = field(default_factory=dict)
    calib_size: int = 128
    calib_seed: int = 0
    exporter: str = "dynamo"
    export_atol: float = 1e-3
    parity_images: list[Path] = field(default_factory=list)
    precisions: tuple[str, ...] = ("fp32", "int8")
    formats: tuple[str, ...] = FORMATS  # "onnx" always comes first: its fp32 file locks the operating point
    tflite_layout: str = "NHWC"  # input layout of the .tflite files (NHWC: what TFLite kernels compute in)
    tflite_int8_io: str = "int8"  # I/O tensors of the int8 .tflite: "int8" (full-integer I/O) or "float32"
    criteria: GateCriteria = field(default_factory=GateCriteria)
    calibrator: str = "minmax"
    exclude_nodes: list[str] = field(default_factory=list)
    fallback: bool = True
    fallback_budget: FallbackBudget = field(default_factory=FallbackBudget)
    debug_layers: bool = True
    allow_failed_gate: bool = False
    # write the bundle when the gate's verdict is INSUFFICIENT EVIDENCE (recorded in the manifest and report)
    allow_insufficient_evidence: bool = False
    force: bool = False
    threads: int = 0
    quality: QualitySpec | None = None  # the bundle's image-quality spec (None: the built-in defaults)
    device: str | None = None  # a device profile: picks the default artifact, recorded in the manifest
    # Sign manifest.json with this Ed25519 private key (bundle/signing.py); the passphrase is never printed.
    sign_key: Path | None = None
    sign_key_passphrase: bytes | None = field(default=None, repr=False)
    dense: DensePreprocessSpec | None = None  # segmentation: None = the checkpoint's (or the defaults)
    seg_criteria: SegmentationCriteria | None = None  # segmentation gate (None: its defaults)


@dataclass
class BuildResult:
    out: Path | None
    manifest: dict[str, Any] | None
    report: dict[str, Any]
    gate_passed: bool
    report_dir: Path
    signed_by: str | None = None  # key id of the signature in manifest.sig
