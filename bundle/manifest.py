# ruff: noqa: RUF009  (spec() is this package's dataclasses.field with JSON rules: it returns a Field)
"""The bundle manifest as typed values: the only contract between the toolchain and the device (schema v2).

``Manifest.from_dict`` checks every field (type, range, cross-references) and raises
:class:`~fundus_edge.errors.BundleError` naming the field; ``to_dict`` is its exact inverse. Version 1 manifests
are migrated in memory (:func:`migrate_v1`). ``manifest.schema.json`` beside this file is generated from these
classes (:func:`json_schema`; a test keeps it in step).

Schema v2 over v1: ``task`` and ``output.meaning`` (what the output tensor means: for classification the class
names and positive classes, which v1 kept under ``model``, the activation and the kind, once ``output.kind``).

Typed at the top only (JSON objects keyed by artifact id): ``quantization``, ``export``, ``gate.criteria``,
``gate.quality``, each artifact's ``gate`` record and ``model.training``.

Segmentation (``task: "segmentation"``): ``output.meaning`` is a :class:`SegmentationMeaning` (``kind``
"pixel-logits": channels, sigmoid, the vessel channel, the locked pixel threshold) and ``dense`` holds the dense
preprocessing (runtime/dense.py) the device tiles photos with; ``preprocessing`` still drives the quality check.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from ..errors import BundleError
from ..runtime.dense import DensePreprocessSpec
from ..runtime.preprocess import PreprocessSpec
from ..runtime.quality import QualitySpec
from ._codecs import PREPROCESSING, PRODUCER, QUALITY, Producer
from ._segmentation import DENSE, SegmentationMeaning
from ._typed import FIX, Codec, JsonObject, JsonRecord, dump, fail, parse, schema_of, spec

SCHEMA = "fundus-edge/bundle"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
Task = Literal["classification", "segmentation"]
Layout = Literal["NCHW", "NHWC"]
DType = Literal["float32", "int8", "uint8"]
_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HEX64 = r"[0-9a-f]{64}"

__all__ = ["SCHEMA", "SCHEMA_VERSION", "Artifact", "ClassificationMeaning", "Compute", "Device", "FileEntry",
           "GateEntry", "GateSummary", "Manifest", "ModelInfo", "OperatingPoint", "OutputMeaning", "OutputSpec",
           "PreprocessSpec", "Producer", "QualitySpec", "SegmentationMeaning", "TensorSpec", "migrate_v1"]


@dataclass(frozen=True, kw_only=True)
class FileEntry(JsonRecord):
    """A file of the bundle: its sha256 and size."""

    sha256: str = spec(pattern=_HEX64)
    bytes: int = spec(ge=0)


@dataclass(frozen=True, kw_only=True)
class TensorSpec(JsonRecord):
    """The model's input tensor: name, shape (``"batch"`` for the free batch dimension), dtype, layout."""

    name: str = spec(min_len=1)
    shape: tuple[int | str, ...] = spec(min_len=1, ge=1)
    dtype: DType = spec()
    layout: Layout | None = spec(default=None)


@dataclass(frozen=True, kw_only=True)
class ClassificationMeaning(JsonRecord):
    """What a classifier's output means: logits over ``class_names``; the referable probability is the
    activation (softmax; sigmoid for one output) summed over ``positive_classes``."""

    kind: Literal["logits"] = spec()
    activation: Literal["softmax", "sigmoid"] = spec()
    class_names: tuple[str, ...] = spec(min_len=1, pattern=r"\S(?:.*\S)?")
    positive_classes: tuple[int, ...] = spec(min_len=1, ge=0)

    def _check(self, where: str) -> None:
        n = len(self.class_names)
        if len(set(self.class_names)) != n:
            fail(f"{where}.class_names", f"names a class twice: {list(self.class_names)}")
        bad = [i for i in self.positive_classes if i >= n]
        if bad:
            fail(f"{where}.positive_classes", f"class index {bad[0]} is out of range: there are {n} classes "
                 f"{list(self.class_names)}, so indices are 0..{n - 1}")
        if len(set(self.positive_classes)) != len(self.positive_classes):
            fail(f"{where}.positive_classes", f"lists a class twice: {list(self.positive_classes)}")
        if len(self.positive_classes) == n and n > 1:
            fail(f"{where}.positive_classes", "lists every class: every eye would be referred")
        if self.activation != ("sigmoid" if n == 1 else "softmax"):
            fail(f"{where}.activation", f"is {self.activation!r}, but the runtime applies "
                 f"{'a sigmoid to one output' if n == 1 else 'a softmax to several outputs'}")


OutputMeaning = ClassificationMeaning | SegmentationMeaning
_MEANING_BY_TASK: dict[str, type[Any]] = {"classification": ClassificationMeaning, "segmentation": SegmentationMeaning}
_MEANING_BY_KIND: dict[str, type[Any]] = {"logits": ClassificationMeaning, "pixel-logits": SegmentationMeaning}


def _parse_meaning(v: Any, where: str) -> OutputMeaning:
    if not isinstance(v, dict):
        fail(where, "must be an object")
    cls = _MEANING_BY_KIND.get(v.get("kind"))  # type: ignore[arg-type]
    if cls is None:
        fail(f"{where}.kind", f"must be one of {sorted(_MEANING_BY_KIND)}, got {v.get('kind')!r}")
    return parse(cls, v, where)


_MEANING = Codec(_parse_meaning, dump, {"anyOf": [schema_of(ClassificationMeaning, {}),
                                                  schema_of(SegmentationMeaning, {})]})


@dataclass(frozen=True, kw_only=True)
class OutputSpec(JsonRecord):
    """The model's output tensor and what it means."""

    name: str = spec(min_len=1)
    shape: tuple[int | str, ...] = spec(min_len=1, ge=1)
    dtype: DType = spec()
    meaning: OutputMeaning = spec(codec=_MEANING)


@dataclass(frozen=True, kw_only=True)
class ModelInfo(JsonRecord):
    """Where the model came from; ``source_format``: a PyTorch model or a brought fp32 file (and its sha256)."""

    source: str = spec()
    arch: str | None = spec()
    num_outputs: int = spec(ge=1)
    referable_rule: str | None = spec()
    training: JsonObject | None = spec()
    source_format: Literal["pytorch", "onnx", "tflite"] | None = spec(default=None)
    source_sha256: str | None = spec(default=None, pattern="^[0-9a-f]{64}$")


@dataclass(frozen=True, kw_only=True)
class OperatingPoint(JsonRecord):
    """The decision threshold on the referable probability, locked on the reference artifact at build time."""

    threshold: float = spec(ge=0.0, le=1.0)
    rule: str = spec()
    locked_on: str | None = spec(default=None)
    sensitivity: float | None = spec(default=None, ge=0.0, le=1.0)
    specificity: float | None = spec(default=None, ge=0.0, le=1.0)

    def decide(self, probability: float) -> str:
        return "refer" if probability >= self.threshold else "no-refer"


@dataclass(frozen=True, kw_only=True)
class Artifact(JsonRecord):
    """One model file in the bundle (``gate``: its gate record, typed only at the top)."""

    id: str = spec(pattern=_ID)
    path: str = spec(min_len=1)
    format: Literal["onnx", "tflite"] = spec()
    precision: Literal["fp32", "int8"] = spec()
    layout: Layout = spec()
    io_dtype: DType = spec(doc="dtype of the model's input/output tensors")
    gate: JsonObject | None = spec(default=None)
    sha256: str | None = spec(default=None, pattern=_HEX64)


@dataclass(frozen=True, kw_only=True)
class GateEntry(JsonRecord):
    """One candidate artifact's verdict against the reference."""

    passed: bool = spec()
    verdict: str | None = spec(default=None, doc="PASS | FAIL | INSUFFICIENT EVIDENCE (gate/verdict.py)")
    delta_auc: float | None = spec()
    delta_sensitivity: float | None = spec()
    flips: int = spec(ge=0)


@dataclass(frozen=True, kw_only=True)
class GateSummary(JsonRecord):
    """The clinical accuracy gate: its criteria, validation size and each candidate's verdict."""

    passed: bool = spec()
    verdict: str | None = spec(default=None, doc="PASS | FAIL | INSUFFICIENT EVIDENCE (gate/verdict.py)")
    allow_failed_gate: bool = spec()
    allow_insufficient_evidence: bool | None = spec(default=None)
    criteria: JsonObject = spec()
    n_validation: int = spec(ge=0)
    summary: Mapping[str, GateEntry] = spec()
    quality: JsonObject | None = spec(default=None)


@dataclass(frozen=True, kw_only=True)
class Compute(JsonRecord):
    """Multiply-accumulates of one inference, counted on the fp32 ONNX at build time (for device projections)."""

    macs: int = spec(ge=0)
    by_op: Mapping[str, int] = spec(ge=0)
    uncounted: tuple[str, ...] = spec()
    counted_on: str = spec()
    ops: tuple[str, ...] = spec()
    input_size: int = spec(ge=1)


@dataclass(frozen=True, kw_only=True)
class Device(JsonRecord):
    """``build --device``: the profile the default artifact was chosen for, and its runtime settings."""

    profile: str = spec()
    artifact: str = spec()
    reason: str = spec()
    threads: int = spec(ge=0)
    providers: tuple[str, ...] = spec()
    latency_budget_ms: float | None = spec(ge=0.0)
    not_built: tuple[str, ...] = spec()


@dataclass(frozen=True, kw_only=True)
class Manifest(JsonRecord):
    """A bundle's manifest.json (schema v2): the only contract between the toolchain and the device."""

    schema: Literal["fundus-edge/bundle"] = spec()
    schema_version: Literal[2] = spec()
    task: Task = spec()
    bundle_id: str = spec(pattern=_ID)
    name: str = spec()
    created: str = spec()
    model: ModelInfo = spec()
    input: TensorSpec = spec()
    output: OutputSpec = spec()
    preprocessing: PreprocessSpec = spec(codec=PREPROCESSING)
    dense: DensePreprocessSpec | None = spec(default=None, codec=DENSE, doc="segmentation: the dense preprocessing")
    operating_point: OperatingPoint = spec()
    artifacts: tuple[Artifact, ...] = spec(min_len=1)
    default_artifact: str | None = spec(default=None)
    gate: GateSummary | None = spec(default=None)
    quality: QualitySpec | None = spec(default=None, codec=QUALITY)
    quantization: Mapping[str, JsonObject] | None = spec(default=None, doc="per artifact id")
    export: Mapping[str, JsonObject] | None = spec(default=None, doc="per artifact id")
    compute: Compute | None = spec(default=None)
    producer: Producer = spec(codec=PRODUCER)
    device: Device | None = spec(default=None)
    files: Mapping[str, FileEntry] = spec(min_len=1)

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Manifest:
        """Check and type a manifest (v1 is migrated first); raises :class:`BundleError` naming the field."""
        if not isinstance(data, dict):
            raise BundleError("the manifest is not a JSON object; it is not a fundus-edge bundle manifest")
        if data.get("schema") != SCHEMA:
            raise BundleError(f"the manifest's schema is {data.get('schema')!r}, not {SCHEMA!r}: it is not a "
                              "fundus-edge bundle manifest")
        version = data.get("schema_version")
        if version not in READABLE_VERSIONS or isinstance(version, bool):
            raise BundleError(f"bundle schema version {version!r} is not supported by this runtime (it reads "
                              f"{list(READABLE_VERSIONS)}); rebuild the bundle with a matching fundus-edge or "
                              "upgrade the runtime")
        if version == 1:
            data = migrate_v1(data)
        if "task" not in data:
            fail("task", "is missing")
        if data["task"] not in _MEANING_BY_TASK:
            fail("task", f"is {data['task']!r}; this runtime knows the tasks {sorted(_MEANING_BY_TASK)}")
        try:
            return parse(cls, data, "")
        except RecursionError as exc:
            raise BundleError(f"the manifest is nested too deeply to be a fundus-edge manifest; {FIX}") from exc

    def to_dict(self) -> dict[str, Any]:
        return dump(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.output.meaning.class_names

    @property
    def positive_classes(self) -> tuple[int, ...]:
        return self.output.meaning.positive_classes

    def artifact_ids(self) -> list[str]:
        return [a.id for a in self.artifacts]

    def gate_passed(self, artifact_id: str) -> bool:
        """Passed, or INSUFFICIENT EVIDENCE that the publisher allowed at build; the reference passes."""
        g = self.gate.summary.get(artifact_id) if self.gate is not None else None
        allowed = self.gate is not None and bool(self.gate.allow_insufficient_evidence)
        return g is None or g.passed or (allowed and g.verdict == "INSUFFICIENT EVIDENCE")

    def with_files(self, files: Mapping[str, FileEntry]) -> Manifest:
        return replace(self, files=dict(files))

    def _check(self, where: str) -> None:
        self._check_artifacts()
        ids = set(self.artifact_ids())
        refs = [("default_artifact", self.default_artifact), ("operating_point.locked_on",
                self.operating_point.locked_on), ("device.artifact", self.device.artifact if self.device else None)]
        for field_name, ref in refs:
            if ref is not None and ref not in ids:
                fail(field_name, f"names the artifact {ref!r}, which the bundle does not have ({sorted(ids)})")
        keyed = [("gate.summary", self.gate.summary if self.gate else {}), ("quantization", self.quantization or {}),
                 ("export", self.export or {})]
        for field_name, mapping in keyed:
            stray = sorted(set(mapping) - ids)
            if stray:
                fail(f"{field_name}.{stray[0]}", f"is not an artifact of this bundle ({sorted(ids)})")
        self._check_shapes()

    def _check_artifacts(self) -> None:
        seen: set[str] = set()
        for i, a in enumerate(self.artifacts):
            if a.id in seen:
                fail(f"artifacts[{i}].id", f"{a.id!r} is used by two artifacts")
            seen.add(a.id)
            if a.path not in self.files:
                fail(f"artifacts[{i}].path", f"{a.path!r} is not in 'files', so it is not covered by a checksum",
                     integrity=True)
            if a.sha256 is not None and a.sha256 != self.files[a.path].sha256:
                fail(f"artifacts[{i}].sha256", f"differs from the checksum of {a.path} in 'files': the manifest "
                     "was edited", integrity=True)
        for rel in self.files:
            p = PurePosixPath(rel)
            if p.is_absolute() or ".." in p.parts or "\\" in rel or not rel.strip():
                fail(f"files.{rel}", "is not a plain relative path inside the bundle")

    def _check_shapes(self) -> None:
        if self.task == "segmentation":
            self._check_segmentation()
            return
        if not isinstance(self.output.meaning, ClassificationMeaning):
            fail("output.meaning.kind", "must be 'logits' for a classification bundle")
        n_classes = len(self.output.meaning.class_names)
        if self.model.num_outputs != n_classes:
            fail("model.num_outputs", f"is {self.model.num_outputs}, but output.meaning names {n_classes} classes")
        if self.output.shape[-1] != n_classes:
            fail("output.shape", f"{list(self.output.shape)} does not end in the {n_classes} classes")
        pre = self.preprocessing
        chw = [3, pre.size, pre.size] if pre.layout == "NCHW" else [pre.size, pre.size, 3]
        if list(self.input.shape[1:]) != chw or self.input.layout != pre.layout:
            fail("input.shape", f"{list(self.input.shape)} ({self.input.layout}) does not match the preprocessing "
                 f"({pre.layout}, size {pre.size}): expected [batch, {', '.join(map(str, chw))}]")

    def _check_segmentation(self) -> None:
        meaning, dense = self.output.meaning, self.dense
        if not isinstance(meaning, SegmentationMeaning):
            fail("output.meaning.kind", "must be 'pixel-logits' for a segmentation bundle")
        if dense is None:
            fail("dense", "is missing: a segmentation bundle records its dense preprocessing")
        if self.model.num_outputs != meaning.channels or len(self.output.shape) != 4 \
                or self.output.shape[1] != meaning.channels:
            fail("output.shape", f"{list(self.output.shape)} is not [batch, {meaning.channels}, H, W]")
        if len(self.input.shape) != 4 or self.input.shape[1] != dense.channels:
            fail("input.shape", f"{list(self.input.shape)} is not [batch, {dense.channels}, H, W] (dense "
                 f"preprocessing colour {dense.color!r})")


def migrate_v1(data: Mapping[str, Any]) -> dict[str, Any]:
    """A v1 manifest as v2, in memory: task classification; the class names, positive classes and output kind
    become ``output.meaning``; artifact ``layout``/``io_dtype`` get the defaults v1 readers assumed."""
    m = copy.deepcopy(dict(data))
    model, output = m.get("model"), m.get("output")
    if not isinstance(model, dict) or not isinstance(output, dict):
        fail("model" if not isinstance(model, dict) else "output", "must be an object (schema v1)")
    for key in ("class_names", "positive_classes"):
        if key not in model:
            fail(f"model.{key}", "is missing (schema v1)")
    names, positive = model.pop("class_names"), model.pop("positive_classes")
    kind = output.pop("kind", "logits")
    activation = "sigmoid" if isinstance(names, list) and len(names) == 1 else "softmax"
    output["meaning"] = {"kind": kind, "activation": activation, "class_names": names, "positive_classes": positive}
    for a in m.get("artifacts") or []:
        if isinstance(a, dict):
            a.setdefault("layout", "NCHW")
            a.setdefault("io_dtype", "float32")
    pre = m.get("preprocessing")
    if isinstance(pre, dict):  # v1 readers filled parameters the manifest did not record with the defaults
        m["preprocessing"] = {**PreprocessSpec().to_dict(), **pre}
    m["schema_version"] = SCHEMA_VERSION
    m["task"] = "classification"
    return m


SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a v2 manifest, generated from the classes above."""
    defs: dict[str, Any] = {}
    top = schema_of(Manifest, defs)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema",
            "$id": "https://fundus-edge.example/manifest.schema.json", "title": "fundus-edge bundle manifest (v2)",
            **top, "$defs": dict(sorted(defs.items()))}


def json_schema_text() -> str:
    """What ``manifest.schema.json`` holds (regenerate it with ``python -m fundus_edge.bundle.manifest``)."""
    return json.dumps(json_schema(), indent=2) + "\n"


if __name__ == "__main__":
    SCHEMA_FILE.write_text(json_schema_text())
