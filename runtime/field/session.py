"""A field session: a verified bundle, an optional result store and audit log, and a per-file screening step
that never raises for a bad image and never screens the same image twice under the same bundle.

One file: read its bytes once (the sha256 and the screening see the same bytes, so a file still being
written cannot be recorded under the wrong hash), look the hash up in the store, screen only when it is new,
record the result durably, audit errors by code and hash (never by path or patient).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import __version__
from ...bundle.read import Bundle
from ...bundle.signing import SignatureStatus, TrustPolicy, verify_bundle
from ...errors import FundusEdgeError, ImageError
from ..backends import BackendSettings
from ..decode_limits import DEFAULT_FILE_MB, MB, DecodeLimits
from ..dicom import dicom_context, is_dicom
from ..safe_io import UnsafeFileError, read_regular, sha256_regular
from ..screen import Prepared, Screener, ScreeningResult, load, overlapped
from ..segment import SegmentationResult, load_segmenter
from .audit import AuditLog
from .segmentation import SegmentationScreener
from .store import ResultStore, StoredScreening, StoreReader, normalize_eye, validate_patient_id

MAYBE_INCOMPLETE = ("decode-failed", "empty-file", "not-an-image")
"""How a file that is still being written fails to decode."""

MAX_FILE_BYTES = DEFAULT_FILE_MB * MB
"""Files larger than this are refused (``too-large``) without being read into memory."""


@dataclass(frozen=True)
class Patient:
    """Optional patient fields stored with a screening. Validated; never logged."""

    patient_id: str | None = None
    eye: str | None = None

    @classmethod
    def of(cls, patient_id: str | None, eye: str | None) -> Patient:
        return cls(validate_patient_id(patient_id), normalize_eye(eye))

    def __repr__(self) -> str:  # keep patient fields out of tracebacks and debug output
        return f"Patient(patient_id={'<set>' if self.patient_id else None}, eye={'<set>' if self.eye else None})"


@dataclass
class _Fetched:
    """One file read for screening: its record so far, bytes (None when unreadable or refused) and error;
    ``prepared``: what the pipeline's worker made of the bytes (or the exception it raised)."""

    rec: StoredScreening
    patient: Patient
    data: bytes | None
    error: dict[str, str] | None
    prepared: Prepared | Exception | None = None


def _dicom_context(rec: StoredScreening, data: bytes, patient: Patient) -> None:
    """A DICOM input's study and laterality into ``rec`` (and its eye, when none was given): part of the row's
    key, so it is read before the store is asked. Never its demographics (runtime/dicom.py reads none)."""
    if not is_dicom(data):
        return
    ctx = dicom_context(data)
    if ctx is None:  # unreadable header or no pydicom: the screening reports why
        return
    rec.study_instance_uid, rec.laterality = ctx.study_instance_uid, ctx.eye
    if patient.eye is None and ctx.eye is not None:
        rec.eye = normalize_eye(ctx.eye)
    elif patient.eye is not None and ctx.eye is not None and normalize_eye(ctx.eye) != patient.eye:
        rec.extra["laterality_mismatch"] = True


class FieldSession:
    """Screen files into a store. Create with :func:`open_session`."""

    def __init__(self, screener: Screener | SegmentationScreener, status: SignatureStatus,
                 store: ResultStore | None = None, audit: AuditLog | None = None,
                 max_file_bytes: int | None = None) -> None:
        self.screener = screener
        self.status = status
        self.store = store
        self.audit = audit
        # the same cap as screening without a store (runtime/decode_limits.py): one rule for both
        self.max_file_bytes = max_file_bytes or screener.decode_limits.max_file_bytes
        self.session_id = uuid.uuid4().hex[:16]
        self.counts: Counter[str] = Counter()

    @property
    def bundle_id(self) -> str:
        return self.screener.bundle.bundle_id

    def _base(self, source: str, sha: str | None, patient: Patient) -> StoredScreening:
        return StoredScreening(
            id=0, created_at="", image_sha256=sha, source=source, bundle_id=self.screener.bundle.bundle_id,
            manifest_sha256=self.screener.bundle.manifest_sha256, artifact=self.screener.artifact.id, ok=False,
            timings_ms={}, kit_version=__version__, patient_id=patient.patient_id, eye=patient.eye,
            backend=self.screener.backend.name, signature_key_id=self.status.key_id if self.status.verified else None,
            session_id=self.session_id, task=getattr(self.screener, "task", "classification"))

    def _screen_bytes(self, data: bytes, prepared: Prepared | Exception | None = None, source: str = ""
                      ) -> ScreeningResult | SegmentationResult:
        """Screen ``data`` (or finish what the pipeline's worker prepared from it, or re-raise its failure)."""
        try:
            if isinstance(prepared, Exception):
                raise prepared
            if isinstance(self.screener, SegmentationScreener):
                return self.screener.screen_named(data, source)
            return self.screener.finish(prepared) if prepared is not None else self.screener.screen(data)
        except ImageError as exc:  # Screener.screen already turns these into results; belt and braces
            return ScreeningResult(source="", error={"code": exc.code, "message": str(exc)})
        except Exception as exc:  # one image must never end the session
            if self.audit is not None:
                self.audit.record("internal-error", session_id=self.session_id, exception=type(exc).__name__)
            return ScreeningResult(source="", error={"code": "internal-error",
                                                     "message": f"{type(exc).__name__}: {exc}"[:300]})

    def screen_file(self, path: str | os.PathLike[str], patient: Patient | None = None,
                    defer: Callable[[StoredScreening], bool] | None = None) -> StoredScreening:
        """Screen one file (or return its stored screening). Never raises for a bad image; raises
        :class:`~fundus_edge.errors.StoreError` when the store cannot record (nothing is recorded then).

        ``defer``: asked about a result that failed in a way an incomplete file fails (:data:`MAYBE_INCOMPLETE`);
        when it says True, nothing is recorded and the result comes back with ``extra["deferred"]`` set (watch
        mode: the file was still being written; it is tried again)."""
        patient = patient or Patient()
        return self._complete(self._read(path, patient), defer)

    def record_failure(self, path: str | os.PathLike[str], patient: Patient | None, code: str,
                       message: str) -> StoredScreening:
        """Store (and audit) ``path`` as failed with ``code`` without screening it (a quarantined file)."""
        patient = patient or Patient()
        rec = self._base(str(path), None, patient)
        with contextlib.suppress(UnsafeFileError):
            rec.image_sha256 = sha256_regular(path, follow_symlinks=True)[0]
        return self._complete(_Fetched(rec, patient, None, {"code": code, "message": message}))

    def screen_files(self, paths: Iterable[str | os.PathLike[str]], patient: Patient | None = None,
                     pipeline: bool = False, stop: threading.Event | None = None) -> Iterator[StoredScreening]:
        """:meth:`screen_file` for each path, in order; stops before the next file once ``stop`` is set.

        ``pipeline``: a worker thread reads, hashes and (unless the store already has the image) decodes and
        preprocesses the next file while this one is inferred and recorded. Whether a file is screened or taken
        from the store is still decided here, just before it would be screened, after every earlier file was
        recorded: the same results as one file at a time (a duplicate in the batch is found in the store)."""
        patient = patient or Patient()
        stopped = (lambda: stop.is_set()) if stop is not None else None
        if not pipeline or isinstance(self.screener, SegmentationScreener):  # segmentation: one at a time
            for path in paths:
                if stopped is not None and stopped():
                    return
                yield self._complete(self._read(path, patient))
            return
        probe = self.store.reader() if self.store is not None else None
        try:
            yield from overlapped(paths, lambda path, slot: self._prefetch(path, patient, slot, probe),
                                  self._complete, stopped)
        finally:
            if probe is not None:
                probe.close()

    def _read(self, path: str | os.PathLike[str], patient: Patient) -> _Fetched:
        """The file's bytes and sha256 (or why they cannot be had)."""
        p = Path(path)
        rec = self._base(str(p), None, patient)
        data: bytes | None = None
        error: dict[str, str] | None = None
        try:  # a regular file (a FIFO or a device is refused, never read), within the size cap
            data = read_regular(p, self.max_file_bytes, follow_symlinks=True)
            rec.image_sha256 = hashlib.sha256(data).hexdigest()
            _dicom_context(rec, data, patient)
        except UnsafeFileError as exc:
            if exc.reason == "too-large":
                with contextlib.suppress(UnsafeFileError):
                    rec.image_sha256 = sha256_regular(p, follow_symlinks=True)[0]
                error = {"code": "too-large", "message": f"file is over the {self.max_file_bytes / 2**20:.0f} MiB "
                                                         "limit"}
            elif exc.reason in ("missing", "unreadable"):
                error = {"code": "not-found", "message": f"cannot read {exc}"}
            else:
                error = {"code": "not-an-image", "message": f"{exc.detail}; only regular image files are read"}
        return _Fetched(rec, patient, data, error)

    def _prefetch(self, path: str | os.PathLike[str], patient: Patient, slot: int,
                  probe: StoreReader | None) -> _Fetched:
        """The pipeline's worker: read and hash, and prepare the image unless the store already has it."""
        f = self._read(path, patient)
        if f.data is None:
            return f
        sha = f.rec.image_sha256
        if probe is not None and sha is not None and probe.has(sha, f.rec.manifest_sha256, f.rec.artifact,
                                                               f.rec.patient_id, f.rec.eye):
            return f  # stored: _complete will find it and take it from the store
        try:
            f.prepared = self.screener.prepare(f.data, slot)
        except Exception as exc:  # contained and audited in _complete, as screen_file does
            f.prepared = exc
        return f

    def _complete(self, f: _Fetched, defer: Callable[[StoredScreening], bool] | None = None) -> StoredScreening:
        """Take the file's screening from the store, or screen it, record it and audit errors."""
        rec, error = f.rec, f.error
        if self.store is not None and rec.image_sha256 is not None:
            existing = self.store.lookup(rec.image_sha256, rec.manifest_sha256, rec.artifact, rec.patient_id,
                                         rec.eye)
            if existing is not None:
                return self._repeat(existing)
        if f.data is not None:
            result = self._screen_bytes(f.data, f.prepared, rec.source)
            _fill(rec, result)
            error = result.error
        if error is not None:
            rec.ok = False
            rec.error_code, rec.error_message = error["code"], error["message"]
            if defer is not None and rec.error_code in MAYBE_INCOMPLETE and defer(rec):
                rec.extra["deferred"] = True
                return rec
        if self.store is not None:
            rec, inserted = self.store.add(rec)
            if not inserted:  # another process recorded the same image (same patient and eye) first
                return self._repeat(rec)
        self.counts["screened"] += 1
        if rec.error_code is not None:
            self.counts["errors"] += 1
            if self.audit is not None:
                self.audit.record("image-error", session_id=self.session_id, code=rec.error_code,
                                  image_sha256=rec.image_sha256, row=rec.id or None)
        return rec

    def _repeat(self, existing: StoredScreening) -> StoredScreening:
        """A stored screening of the same image for the same patient and eye (the store's key includes both)."""
        self.counts["stored"] += 1
        existing.extra["stored"] = True
        return existing

    def close(self, reason: str = "done") -> None:
        if self.audit is not None:
            self.audit.record("session-stop", session_id=self.session_id, reason=reason,
                              screened=self.counts["screened"], stored=self.counts["stored"],
                              errors=self.counts["errors"])
        self.screener.close()

    def __enter__(self) -> FieldSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fill(rec: StoredScreening, result: ScreeningResult | SegmentationResult) -> None:
    """A screening's (or a segmentation's) outcome into its row."""
    rec.ok = bool(result)
    rec.decision = result.decision
    rec.probability = getattr(result, "probability", None)  # a segmentation has none
    rec.threshold = result.threshold
    rec.fov = result.fov
    rec.quality = result.quality  # set by the quality gate, when present
    rec.timings_ms = {k: round(v, 3) for k, v in result.timings_ms.items()}
    if isinstance(result, SegmentationResult):
        rec.biomarkers, rec.mask_path, rec.overlay_path = result.biomarkers, result.mask, result.overlay


def check_bundle(bundle: str | os.PathLike[str], policy: TrustPolicy | None = None,
                 audit: AuditLog | None = None) -> tuple[Bundle, SignatureStatus]:
    """:func:`~fundus_edge.bundle.signing.verify_bundle` with the refusal, if any, in the audit log."""
    policy = policy or TrustPolicy()
    try:
        return verify_bundle(bundle, policy)
    except FundusEdgeError as exc:
        _audit_refusal(audit, bundle, exc, policy)
        raise


def _audit_refusal(audit: AuditLog | None, bundle: str | os.PathLike[str], exc: FundusEdgeError,
                   policy: TrustPolicy) -> None:
    if audit is not None:
        audit.record("bundle-refused", bundle=str(bundle), code=exc.code, reason=getattr(exc, "reason", None),
                     message=str(exc), policy=policy.to_dict())


Choice = Callable[[Bundle], tuple["str | None", "str | None", "BackendSettings | None"]]


def open_session(bundle: str | os.PathLike[str], *, policy: TrustPolicy | None = None,
                 store: ResultStore | None = None, audit: AuditLog | None = None, artifact: str | None = None,
                 fmt: str | None = None, precision: str | None = None,
                 settings: BackendSettings | None = None, choose: Choice | None = None,
                 mode: str = "batch", decode_limits: DecodeLimits | None = None,
                 out_dir: str | os.PathLike[str] | None = None) -> FieldSession:
    """Verify (signature per ``policy``, then checksums) and load a bundle. A refusal is audited and raised.

    ``choose``: called with the verified bundle, returns (artifact, format, settings) in place of the
    arguments (a device profile picks the artifact from the bundle's list). A segmentation bundle writes its
    masks and overlays into ``out_dir`` (runtime/field/segmentation.py)."""
    policy = policy or TrustPolicy()
    verified, status = check_bundle(bundle, policy, audit)
    if choose is not None:
        artifact, fmt, settings = choose(verified)
    try:
        screener: Screener | SegmentationScreener
        if verified.spec.task == "segmentation":
            seg = load_segmenter(verified, artifact=artifact, fmt=fmt, precision=precision, settings=settings)
            screener = SegmentationScreener(seg, Path(out_dir or "fundus-edge-vessels"), decode_limits)
        else:
            screener = load(verified, artifact=artifact, fmt=fmt, precision=precision, settings=settings,
                            decode_limits=decode_limits)
    except FundusEdgeError as exc:
        _audit_refusal(audit, bundle, exc, policy)
        raise
    session = FieldSession(screener, status, store, audit)
    if audit is not None:
        details: dict[str, Any] = {"bundle": str(bundle), "bundle_id": screener.bundle.bundle_id,
                                   "manifest_sha256": screener.bundle.manifest_sha256,
                                   "artifact": screener.artifact.id, "backend": screener.backend.name,
                                   "signature": status.to_dict(), "policy": policy.to_dict()}
        audit.record("bundle-loaded", session_id=session.session_id, mode=mode, **details)
    return session
