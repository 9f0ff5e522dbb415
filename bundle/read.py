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
from ..runtime.safe_io import UnsafeFileError, inside, read_regular, sha256_regular
from ._files import MANIFEST, file_entry, sha256_file
from .manifest import SCHEMA, SCHEMA_VERSION, Artifact, Manifest, OperatingPoint
from .write import write_manifest

MAX_MANIFEST_BYTES = 16 << 20  # a manifest is a few KB; anything near this is not one

__all__ = ["MANIFEST", "SCHEMA", "SCHEMA_VERSION", "Artifact", "Bundle", "Manifest", "OperatingPoint", "file_entry",
           "load_bundle", "parse_manifest", "read_bundle_file", "sha256_file", "verify_files", "write_manifest"]


def read_bundle_file(root: Path, rel: str, max_bytes: int | None, missing_ok: bool = False) -> bytes | None:
    """The bytes of the bundle file ``rel``: a regular file inside ``root`` (not a symlink, FIFO, device or
    directory), at most ``max_bytes``. Raises :class:`BundleError` (exit 4); None when absent and ``missing_ok``."""
    try:
        return read_regular(inside(root, rel), max_bytes)
    except UnsafeFileError as exc:
        if exc.reason == "missing" and missing_ok:
            return None
        if exc.reason == "missing":
            raise BundleError(f"{root} has no {rel}; it is not a complete fundus-edge bundle") from exc
        raise BundleIntegrityError(f"bundle file {rel} {exc.detail}: refusing the bundle; copy it again from its "
                                   "source") from exc


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

    def read_artifact(self, artifact: Artifact) -> bytes:
        """The model file's bytes, read once and checked against the manifest's sha256 and size: hand THESE bytes
        to the backend (never re-open the path, which may have been swapped since it was verified)."""
        entry = self.spec.files.get(artifact.path)
        if entry is None:
            raise BundleIntegrityError(f"artifact {artifact.id}: {artifact.path} is not listed among the bundle's "
                                       "files; rebuild the bundle")
        data = read_bundle_file(self.root, artifact.path, entry.bytes)
        assert data is not None
        if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
            raise BundleIntegrityError(f"bundle file {artifact.path} does not match its sha256 in the manifest "
                                       "(it changed after the bundle was verified); do not use this bundle")
        return data


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
    raw = read_bundle_file(root, MANIFEST, MAX_MANIFEST_BYTES)
    assert raw is not None
    try:
        spec = parse_manifest(raw, str(manifest_path))
    except BundleError as exc:
        raise type(exc)(f"{manifest_path}: {exc}") from exc
    if verify:
        verify_files(root, spec)
    return Bundle(root, spec, hashlib.sha256(raw).hexdigest())


def verify_files(root: Path, manifest: Manifest) -> None:
    """Raise :class:`BundleIntegrityError` naming the first file that is missing, resized or altered (or is not a
    regular file inside the bundle: a symlink, FIFO, device or directory)."""
    for rel, entry in manifest.files.items():
        try:
            digest, n = sha256_regular(inside(root, rel), entry.bytes)
        except UnsafeFileError as exc:
            if exc.reason == "missing":
                raise BundleIntegrityError(f"bundle file {rel} is missing; copy the whole bundle directory again") \
                    from exc
            if exc.reason == "too-large":
                raise BundleIntegrityError(f"bundle file {rel} {exc.detail}, the manifest says {entry.bytes}: it was "
                                           "altered; do not use this bundle") from exc
            raise BundleIntegrityError(f"bundle file {rel} {exc.detail}; do not use this bundle") from exc
        if n != entry.bytes:
            raise BundleIntegrityError(
                f"bundle file {rel} has {n} bytes, the manifest says {entry.bytes}: "
                "it was altered or truncated; do not use this bundle"
            )
        if digest != entry.sha256:
            raise BundleIntegrityError(
                f"bundle file {rel} does not match its sha256 in the manifest: it was altered or damaged; "
                "do not use this bundle"
            )
