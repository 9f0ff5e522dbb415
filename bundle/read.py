"""The bundle: the only contract between the toolchain and the device.

A bundle is a directory holding ``manifest.json`` and the files it lists. The manifest records, for every
file, its sha256 and size; for every model artifact, its format, precision and I/O layout; plus the input
spec, the preprocessing spec, the labels and referable mapping, the locked operating point, the gate result,
the quantization summary and the producer's versions. The runtime needs nothing else, and it refuses to load
a bundle whose schema it does not know or whose files do not match their checksums.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BundleError, BundleIntegrityError, UsageError
from ..runtime.preprocess import PreprocessSpec
from ..runtime.quality import QualitySpec

SCHEMA = "fundus-edge/bundle"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

_REQUIRED = ("schema", "schema_version", "bundle_id", "model", "input", "output", "preprocessing",
             "operating_point", "artifacts", "files", "producer")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """One model file in the bundle."""

    id: str
    path: str
    format: str  # "onnx" | "tflite"
    precision: str  # "fp32" | "int8"
    layout: str  # "NCHW" | "NHWC"
    io_dtype: str  # dtype of the model's input/output tensors: "float32" | "int8" | "uint8"
    gate: dict[str, Any] | None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Artifact:
        try:
            return cls(id=d["id"], path=d["path"], format=d["format"], precision=d["precision"],
                       layout=d.get("layout", "NCHW"), io_dtype=d.get("io_dtype", "float32"),
                       gate=d.get("gate"))
        except KeyError as exc:
            raise BundleError(f"artifact entry is missing the field {exc}; rebuild the bundle") from exc


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    rule: str

    def decide(self, probability: float) -> str:
        return "refer" if probability >= self.threshold else "no-refer"


class Bundle:
    """A verified bundle. Use :func:`load_bundle`; construction verifies nothing by itself."""

    def __init__(self, root: Path, manifest: dict[str, Any], manifest_sha256: str) -> None:
        self.root = root
        self.manifest = manifest
        self.manifest_sha256 = manifest_sha256
        self.preprocessing = PreprocessSpec.from_dict(manifest["preprocessing"])
        op = manifest["operating_point"]
        self.operating_point = OperatingPoint(threshold=float(op["threshold"]), rule=str(op.get("rule", "")))
        self.artifacts = [Artifact.from_dict(a) for a in manifest["artifacts"]]
        if not self.artifacts:
            raise BundleError(f"{root}: the manifest lists no model artifacts")
        # Optional (added with the quality gate): bundles without it get the default quality spec.
        try:
            self.quality = QualitySpec.from_dict(manifest.get("quality") or {})
        except UsageError as exc:
            raise BundleError(f"{root}: the manifest's quality spec is unusable: {exc}") from exc

    @property
    def bundle_id(self) -> str:
        return str(self.manifest["bundle_id"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["model"]["class_names"])

    @property
    def positive_classes(self) -> list[int]:
        return [int(i) for i in self.manifest["model"]["positive_classes"]]

    @property
    def input_name(self) -> str:
        return str(self.manifest["input"]["name"])

    def artifact(self, artifact_id: str | None = None, fmt: str | None = None,
                 precision: str | None = None) -> Artifact:
        """Pick an artifact by id, or by format/precision (preferring the default, then its precision)."""
        if artifact_id:
            for a in self.artifacts:
                if a.id == artifact_id:
                    return a
            raise BundleError(f"no artifact {artifact_id!r} in this bundle; it has {[a.id for a in self.artifacts]}")
        matches = [a for a in self.artifacts
                   if (fmt is None or a.format == fmt) and (precision is None or a.precision == precision)]
        if not matches:
            raise BundleError(
                f"no {fmt or 'any'}/{precision or 'any'} artifact in this bundle; "
                f"it has {[a.id for a in self.artifacts]}"
            )
        default = self.manifest.get("default_artifact")
        for a in matches:
            if a.id == default:
                return a
        # another format than the default's: the same precision as the default (int8 when the gate passed)
        default_precision = next((a.precision for a in self.artifacts if a.id == default), None)
        return next((a for a in matches if a.precision == default_precision), matches[0])

    def path(self, artifact: Artifact) -> Path:
        return self.root / artifact.path


def load_bundle(path: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Read a bundle directory, check its schema, and (by default) every file's sha256 and size."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle directory (build one with 'fundus-edge build')")
    if not manifest_path.is_file():
        raise BundleError(f"{root} has no {MANIFEST}; it is not a fundus-edge bundle")
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise BundleIntegrityError(f"{manifest_path} is not valid JSON ({exc}); the bundle is damaged") from exc
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        raise BundleError(f"{manifest_path} is not a {SCHEMA} manifest")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"bundle schema version {version} is not supported by this runtime (it reads {SCHEMA_VERSION}); "
            "rebuild the bundle with a matching fundus-edge or upgrade the runtime"
        )
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise BundleError(f"{manifest_path} lacks required fields {missing}; rebuild the bundle")
    if verify:
        verify_files(root, manifest)
    listed = manifest["files"]
    for a in manifest["artifacts"]:
        if a.get("path") not in listed:
            raise BundleIntegrityError(f"artifact {a.get('id')} file {a.get('path')} is not covered by a checksum")
        if "sha256" in a and a["sha256"] != listed[a["path"]].get("sha256"):
            raise BundleIntegrityError(f"artifact {a.get('id')} records a sha256 that differs from the file list's "
                                       f"for {a['path']}; the manifest was edited: do not use this bundle")
    return Bundle(root, manifest, hashlib.sha256(raw).hexdigest())


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Raise :class:`BundleIntegrityError` naming the first file that is missing, resized or altered."""
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise BundleIntegrityError("the manifest's file list is empty")
    for rel, entry in files.items():
        p = (root / rel).resolve()
        if root.resolve() not in p.parents:
            raise BundleIntegrityError(f"manifest path {rel!r} points outside the bundle")
        if not p.is_file():
            raise BundleIntegrityError(f"bundle file {rel} is missing; copy the whole bundle directory again")
        if p.stat().st_size != entry["bytes"]:
            raise BundleIntegrityError(
                f"bundle file {rel} has {p.stat().st_size} bytes, the manifest says {entry['bytes']}: "
                "it was altered or truncated; do not use this bundle"
            )
        if sha256_file(p) != entry["sha256"]:
            raise BundleIntegrityError(
                f"bundle file {rel} does not match its sha256 in the manifest: it was altered or damaged; "
                "do not use this bundle"
            )


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_manifest(root: Path, manifest: dict[str, Any]) -> Path:
    """Fill ``files`` with the checksum of every listed file and write ``manifest.json`` atomically."""
    manifest = dict(manifest)
    manifest["schema"] = SCHEMA
    manifest["schema_version"] = SCHEMA_VERSION
    manifest["files"] = {rel: file_entry(root / rel) for rel in sorted(manifest["files"])}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, root / MANIFEST)
    return root / MANIFEST
