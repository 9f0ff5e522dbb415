"""One row of the result store (:class:`StoredScreening`), the patient fields' rules, and export as CSV / JSON
lines (:func:`export_rows`, and :func:`export_file`: atomic, nothing left behind on failure)."""

from __future__ import annotations

import csv
import json
import os
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ...errors import StoreError, UsageError

JSON_COLUMNS = ("quality", "fov", "timings_ms", "biomarkers")
EXPORT_COLUMNS = ("id", "created_at", "image_sha256", "source", "patient_id", "eye", "bundle_id", "manifest_sha256",
                  "artifact", "backend", "signature_key_id", "ok", "decision", "probability", "threshold",
                  "quality", "fov", "timings_ms", "error_code", "error_message", "kit_version", "session_id",
                  "task", "study_instance_uid", "laterality", "biomarkers", "mask_path", "overlay_path")
PATIENT_COLUMNS = ("patient_id", "eye")

_EYES = {"left": "left", "l": "left", "os": "left", "right": "right", "r": "right", "od": "right"}
_PATIENT_ID = re.compile(r"^[\w.\-/:#+ ]{1,64}$")
PATIENT_ID_ENV = "FUNDUS_EDGE_PATIENT_ID"
_PATIENT_FILE_MAX = 4096


def normalize_eye(value: str | None) -> str | None:
    """``left``/``right`` from left, right, L, R, OS (left) or OD (right); None stays None."""
    if value is None:
        return None
    eye = _EYES.get(value.strip().lower())
    if eye is None:
        raise UsageError(f"--eye must be left, right, L, R, OS (left) or OD (right), got {value!r}")
    return eye


def validate_patient_id(value: str | None) -> str | None:
    """1-64 characters: letters, digits, space and ``. - / : # + _``. None stays None."""
    if value is None:
        return None
    pid = value.strip()
    if not _PATIENT_ID.match(pid):
        raise UsageError("--patient-id must be 1-64 characters of letters, digits, space and . - / : # + _")
    return pid


def patient_id_from(argv_value: str | None, file: str | os.PathLike[str] | None,
                    environ: dict[str, str] | None = None) -> str | None:
    """The patient ID from ``--patient-id`` (visible to every local user in ``ps``), ``--patient-id-file F``
    (its first line), or ``$FUNDUS_EDGE_PATIENT_ID``, in that order; giving both options is refused."""
    env = os.environ if environ is None else environ
    if argv_value is not None and file is not None:
        raise UsageError("give --patient-id or --patient-id-file, not both")
    if file is not None:
        from ..safe_io import UnsafeFileError, read_regular

        try:
            data = read_regular(Path(file), _PATIENT_FILE_MAX, follow_symlinks=True)
        except UnsafeFileError as exc:
            raise UsageError(f"--patient-id-file: cannot read it ({exc}); give a small regular file holding the "
                             "patient ID on its first line") from exc
        lines = data.decode("utf-8", "replace").splitlines()
        if not lines or not lines[0].strip():
            raise UsageError("--patient-id-file is empty: its first line must hold the patient ID")
        return validate_patient_id(lines[0])
    if argv_value is not None:
        return validate_patient_id(argv_value)
    value = env.get(PATIENT_ID_ENV)
    return validate_patient_id(value) if value else None


@dataclass
class StoredScreening:
    """One row of the store. Truthy when the image was screened (``ok``)."""

    id: int
    created_at: str
    image_sha256: str | None
    source: str
    bundle_id: str
    manifest_sha256: str
    artifact: str
    ok: bool
    timings_ms: dict[str, float]
    kit_version: str
    patient_id: str | None = field(default=None, repr=False)  # patient fields stay out of reprs and logs
    eye: str | None = field(default=None, repr=False)
    backend: str | None = None
    signature_key_id: str | None = None
    decision: str | None = None
    probability: float | None = None
    threshold: float | None = None
    quality: dict[str, Any] | None = None
    fov: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    session_id: str | None = None
    task: str | None = None  # classification | segmentation (None in rows of schema 1: classification)
    study_instance_uid: str | None = None  # DICOM input: the study it belongs to
    laterality: str | None = None  # DICOM input: R | L as the file says (ImageLaterality, else Laterality)
    biomarkers: dict[str, Any] | None = None  # segmentation: vessel density, fractal dimension (+ fit r2)
    mask_path: str | None = None  # segmentation: the vessel mask PNG
    overlay_path: str | None = None  # segmentation: the overlay PNG
    extra: dict[str, Any] = field(default_factory=dict)  # not stored: e.g. {"stored": True} on a repeat

    def __bool__(self) -> bool:
        return self.ok

    @property
    def error(self) -> dict[str, str] | None:
        if self.error_code is None:
            return None
        return {"code": self.error_code, "message": self.error_message or ""}

    def to_dict(self, include_patient: bool = False) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        if not include_patient:
            for k in PATIENT_COLUMNS:
                d.pop(k)
        return d

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> StoredScreening:
        d = dict(row)
        for k in JSON_COLUMNS:
            if k in d:
                d[k] = json.loads(d[k]) if d[k] is not None else None
        d["ok"] = bool(d["ok"])
        d["timings_ms"] = d["timings_ms"] or {}
        return cls(**d)


def export_rows(rows: Iterator[StoredScreening], out: TextIO, fmt: str, include_patient: bool = True) -> int:
    """Write rows as ``csv`` (one header line; JSON columns as JSON text) or ``jsonl``; returns the count."""
    columns = [c for c in EXPORT_COLUMNS if include_patient or c not in PATIENT_COLUMNS]
    n = 0
    if fmt == "jsonl":
        for r in rows:
            out.write(json.dumps(r.to_dict(include_patient=include_patient), sort_keys=True) + "\n")
            n += 1
    elif fmt == "csv":
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in rows:
            d = r.to_dict(include_patient=include_patient)
            for k in JSON_COLUMNS:
                d[k] = json.dumps(d[k], sort_keys=True) if d[k] is not None else ""
            writer.writerow({k: _csv_safe(d[k]) for k in columns})
            n += 1
    else:
        raise UsageError(f"export format must be csv or jsonl, got {fmt!r}")
    return n


def export_file(rows: Iterator[StoredScreening], out: Path, fmt: str, include_patient: bool = True) -> int:
    """:func:`export_rows` into ``out``, atomically: a new ``0600`` file next to it, synced, renamed into place.
    On any failure (disk full, an interrupt) the partial file is removed: no copy of patient IDs is left behind,
    and ``out`` keeps what it held before."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.export.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot write the export next to {out}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            n = export_rows(rows, fh, fmt, include_patient=include_patient)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StoreError(f"writing the export {out} failed: {exc.strerror or exc}; nothing was written "
                             "(the partial file was removed)") from exc
        raise
    fsync_dir(out.parent)
    return n


def fsync_dir(d: Path) -> None:
    """Make a rename or a new file in ``d`` durable (best effort: some filesystems refuse a directory fsync)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _csv_safe(value: Any) -> Any:
    """Neutralise spreadsheet formula injection in free-text cells (a file name starting with '=')."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
