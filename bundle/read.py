"""The bundle: the only contract between the toolchain and the device.

A bundle is a directory holding ``manifest.json`` and the files it lists. The manifest records, for every
file, its sha256 and size; for every model artifact, its format, precision and I/O layout; plus the input
spec, the preprocessing spec, the labels and referable mapping, the locked operating point, the gate result,
the quantization summary and the producer's versions. The runtime needs nothing else, and it refuses to load
a bundle whose schema it does not know, whose manifest breaks a rule of :mod:`.manifest`, or whose files do
not match their checksums. The manifest is typed (:class:`~fundus_edge.bundle.manifest.Manifest`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..errors import BundleError, BundleIntegrityError
from ..runtime.preprocess import PreprocessSpec
from ..runtime.quality import QualitySpec
from ._files import MANIFEST, file_entry, sha256_file
from .manifest import SCHEMA, SCHEMA_VERSION, Artifact, Manifest, OperatingPoint
from .write import write_manifest

__all__ = ["MANIFEST", "SCHEMA", "SCHEMA_VERSION", "Artifact", "Bundle", "Manifest", "OperatingPoint", "file_entry",
           "load_bundle", "parse_manifest", "sha256_file", "verify_files", "write_manifest"]


class Bundle:
    """A verified bundle. Use :func:`load_bundle`; construction verifies nothing by itself.

    ``spec`` is the typed manifest; ``manifest`` the same as JSON data (``spec.to_dict()``: a v1 bundle shows its
    v2 form), kept for display and for code that still reads it by key.
    """

    def __init__(self, root: Path, spec: Manifest, manifest_sha256: str) -> None:
        self.root = root
        self.spec = spec
        self.manifest: dict[str, Any] = spec.to_dict()
        self.manifest_sha256 = manifest_sha256
        self.artifacts: list[Artifact] = list(spec.artifacts)
        # Optional (added with the quality gate): bundles without it get the default quality spec.
        self.quality: QualitySpec = spec.quality if spec.quality is not None else QualitySpec()

    @property
    def preprocessing(self) -> PreprocessSpec:
        return self.spec.preprocessing

    @property
    def operating_point(self) -> OperatingPoint:
        return self.spec.operating_point

    @property
    def bundle_id(self) -> str:
        return self.spec.bundle_id

    @property
    def class_names(self) -> list[str]:
        return list(self.spec.class_names)

    @property
    def positive_classes(self) -> list[int]:
        return list(self.spec.positive_classes)

    @property
    def input_name(self) -> str:
        return self.spec.input.name

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
        default = self.spec.default_artifact
        for a in matches:
            if a.id == default:
                return a
        # another format than the default's: the same precision as the default (int8 when the gate passed)
        default_precision = next((a.precision for a in self.artifacts if a.id == default), None)
        return next((a for a in matches if a.precision == default_precision), matches[0])

    def path(self, artifact: Artifact) -> Path:
        return self.root / artifact.path


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise BundleError(f"the manifest names the field {k!r} twice (JSON readers disagree on which one counts);"
                              " rebuild the bundle with 'fundus-edge build'")
        out[k] = v
    return out


def parse_manifest(raw: bytes | str, where: str = MANIFEST) -> Manifest:
    """A typed :class:`Manifest` from the bytes of manifest.json: strict JSON (no duplicate keys), every field
    checked; raises :class:`BundleError` (:class:`BundleIntegrityError` when it is not JSON at all)."""
    try:
        data = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except RecursionError as exc:
        raise BundleError(f"{where} is nested too deeply to be a fundus-edge manifest; the bundle is damaged") \
            from exc
    except ValueError as exc:  # UnicodeDecodeError included
        raise BundleIntegrityError(f"{where} is not valid JSON ({exc}); the bundle is damaged") from exc
    return Manifest.from_dict(data)


def load_bundle(path: str | os.PathLike[str], verify: bool = True) -> Bundle:
    """Read a bundle directory, check its manifest, and (by default) every file's sha256 and size."""
    root = Path(path)
    manifest_path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"{root} is not a bundle directory (build one with 'fundus-edge build')")
    if not manifest_path.is_file():
        raise BundleError(f"{root} has no {MANIFEST}; it is not a fundus-edge bundle")
    raw = manifest_path.read_bytes()
    try:
        spec = parse_manifest(raw, str(manifest_path))
    except BundleError as exc:
        raise type(exc)(f"{manifest_path}: {exc}") from exc
    if verify:
        verify_files(root, spec)
    return Bundle(root, spec, hashlib.sha256(raw).hexdigest())


def verify_files(root: Path, manifest: Manifest) -> None:
    """Raise :class:`BundleIntegrityError` naming the first file that is missing, resized or altered."""
    for rel, entry in manifest.files.items():
        p = (root / rel).resolve()
        if root.resolve() not in p.parents:
            raise BundleIntegrityError(f"manifest path {rel!r} points outside the bundle")
        if not p.is_file():
            raise BundleIntegrityError(f"bundle file {rel} is missing; copy the whole bundle directory again")
        if p.stat().st_size != entry.bytes:
            raise BundleIntegrityError(
                f"bundle file {rel} has {p.stat().st_size} bytes, the manifest says {entry.bytes}: "
                "it was altered or truncated; do not use this bundle"
            )
        if sha256_file(p) != entry.sha256:
            raise BundleIntegrityError(
                f"bundle file {rel} does not match its sha256 in the manifest: it was altered or damaged; "
                "do not use this bundle"
            )
