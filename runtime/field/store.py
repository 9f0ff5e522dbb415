"""The durable offline result store: one SQLite file holding every screening made on the device.

Durability: WAL journal with ``synchronous=FULL``. In WAL mode FULL syncs the WAL on every commit, so a
screening that was reported (and a file moved away afterwards) survives a power cut, which on a handheld
running on a battery is an event, not a corner case. ``NORMAL`` would keep the database consistent but may
roll back the last commits after a power loss; its saving (one fsync per screening, about 1-5 ms on an SD
card) is small next to a screening (decode + inference, 50-500 ms on a Raspberry Pi), so FULL it is.

Idempotency: a screening is keyed by ``(image_sha256, manifest_sha256, artifact)``: the same image bytes
under the same bundle and model file are screened once; asking again returns the stored row. A unique index
enforces it, so two processes writing the same store cannot duplicate a result either. Two exceptions, both
without a usable key: files that could not be read (no sha256) and ``internal-error`` results, which are
recorded every time they happen and may be retried.

Records are immutable: triggers refuse UPDATE and DELETE on ``screenings``. ``decision`` is free text
(``refer``, ``no-refer``, and the quality gate's ``ungradable``) and ``quality`` a nullable JSON column, so
the quality gate adds values, not columns. The schema version lives in ``PRAGMA user_version``; a store
written by a newer kit is refused rather than guessed at.

The file is created ``0600``: it holds patient data.
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from ...errors import StoreError, UsageError
from .audit import utc_now
from .integrity import ROW_MACS_SCHEMA, Integrity, check_store_anchor, mac_new_row, store_state

STORE_SCHEMA_VERSION = 1
SYNCHRONOUS = "FULL"
RETRYABLE_ERRORS = ("internal-error",)

_SCHEMA = (
    """CREATE TABLE screenings (
        id               INTEGER PRIMARY KEY AUTOINCREMENT,
        created_at       TEXT    NOT NULL,
        image_sha256     TEXT,
        source           TEXT    NOT NULL,
        patient_id       TEXT,
        eye              TEXT,
        bundle_id        TEXT    NOT NULL,
        manifest_sha256  TEXT    NOT NULL,
        artifact         TEXT    NOT NULL,
        backend          TEXT,
        signature_key_id TEXT,
        ok               INTEGER NOT NULL,
        decision         TEXT,
        probability      REAL,
        threshold        REAL,
        quality          TEXT,
        fov              TEXT,
        timings_ms       TEXT    NOT NULL,
        error_code       TEXT,
        error_message    TEXT,
        kit_version      TEXT    NOT NULL,
        session_id       TEXT
    )""",
    """CREATE UNIQUE INDEX screenings_once ON screenings (image_sha256, manifest_sha256, artifact)
        WHERE image_sha256 IS NOT NULL AND (error_code IS NULL OR error_code NOT IN ('internal-error'))""",
    "CREATE INDEX screenings_created ON screenings (created_at)",
    """CREATE TRIGGER screenings_immutable_update BEFORE UPDATE ON screenings
        BEGIN SELECT RAISE(ABORT, 'screening records are immutable'); END""",
    """CREATE TRIGGER screenings_immutable_delete BEFORE DELETE ON screenings
        BEGIN SELECT RAISE(ABORT, 'screening records are immutable'); END""",
)

_JSON_COLUMNS = ("quality", "fov", "timings_ms")
EXPORT_COLUMNS = ("id", "created_at", "image_sha256", "source", "patient_id", "eye", "bundle_id", "manifest_sha256",
                  "artifact", "backend", "signature_key_id", "ok", "decision", "probability", "threshold",
                  "quality", "fov", "timings_ms", "error_code", "error_message", "kit_version", "session_id")
PATIENT_COLUMNS = ("patient_id", "eye")

_EYES = {"left": "left", "l": "left", "os": "left", "right": "right", "r": "right", "od": "right"}
_PATIENT_ID = re.compile(r"^[\w.\-/:#+ ]{1,64}$")


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
        for k in _JSON_COLUMNS:
            d[k] = json.loads(d[k]) if d[k] is not None else None
        d["ok"] = bool(d["ok"])
        d["timings_ms"] = d["timings_ms"] or {}
        return cls(**d)


# A final screening of these image bytes under this bundle and artifact (an internal error is not final).
_FINAL = ("image_sha256 = ? AND manifest_sha256 = ? AND artifact = ? AND "
          "(error_code IS NULL OR error_code NOT IN ('internal-error'))")


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30.0)
    conn.row_factory = sqlite3.Row
    return conn


def _parse_time(value: str, option: str) -> str:
    """An ISO date or date-time (naive means UTC) in the store's text form."""
    try:
        t = _dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise UsageError(f"{option} takes an ISO date or date-time (2025-03-01 or 2025-03-01T14:00), "
                         f"got {value!r}") from exc
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ResultStore:
    """The SQLite store. Open with ``ResultStore(path)``; use as a context manager."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True,
                 integrity: Integrity | None = None) -> None:
        self.path = Path(path)
        # keyed integrity (runtime/field/integrity.py): row macs, and an anchor outside the store
        self.integrity = integrity
        anchor = integrity.read_anchor(self.path, "store") if integrity is not None else None
        if not self.path.exists() and anchor is not None and anchor.get("rows"):
            raise StoreError(f"result store {self.path} is missing, but this device recorded {anchor['rows']} rows "
                             "in it: refusing to start a new one. Restore the store from its backup or last export")
        if not self.path.exists():
            if not create:
                raise StoreError(f"result store {self.path} does not exist")
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            except OSError as exc:
                raise StoreError(f"cannot create the result store {self.path}: {exc.strerror or exc}") from exc
        try:
            self._conn = _connect(self.path)
            self._setup()
            if integrity is not None:
                self._conn.execute(ROW_MACS_SCHEMA)
                problems = check_store_anchor(self._conn, integrity, self.path)
                if problems and create:  # verify (create=False) reports them instead
                    self._conn.close()
                    raise StoreError(f"result store {self.path} does not match what this device recorded: "
                                     f"{'; '.join(problems)}. Refusing to start; run 'fundus-edge results verify'")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path} is not a usable fundus-edge result store ({exc}); "
                             "check the path, the disk, and the file's permissions") from exc

    def _setup(self) -> None:
        c = self._conn
        c.execute("PRAGMA busy_timeout = 30000")
        mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: SQLite could not switch to WAL journaling (got {mode!r}); put the "
                             "store on a local file system (ext4 on the device), not a network share")
        c.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
        version = c.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            c.execute("BEGIN IMMEDIATE")
            try:
                if c.execute("PRAGMA user_version").fetchone()[0] == 0:  # another process may have won
                    for statement in _SCHEMA:
                        c.execute(statement)
                    c.execute(f"PRAGMA user_version = {STORE_SCHEMA_VERSION}")
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
        elif version > STORE_SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer fundus-edge (store schema {version}, this kit "
                             f"reads {STORE_SCHEMA_VERSION}); upgrade fundus-edge on this device")

    # ------------------------------------------------------------------------------------------- writing
    def lookup(self, image_sha256: str, manifest_sha256: str, artifact: str) -> StoredScreening | None:
        """The stored, final screening of these image bytes under this bundle and artifact, if any."""
        try:
            row = self._conn.execute(f"SELECT * FROM screenings WHERE {_FINAL} ORDER BY id LIMIT 1",
                                     (image_sha256, manifest_sha256, artifact)).fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"reading the result store {self.path} failed: {exc}") from exc
        return StoredScreening.from_row(row) if row is not None else None

    def reader(self) -> StoreReader:
        """A lookup-only view of this store with its own connection, for another thread (the screening
        pipeline's worker asks it whether an image is stored before decoding it)."""
        return StoreReader(self.path)

    def add(self, rec: StoredScreening) -> tuple[StoredScreening, bool]:
        """Insert ``rec`` (its ``id``/``created_at`` are assigned here) unless an equivalent final screening
        is already stored; returns (the stored row, whether it was inserted now). Committed durably on return."""
        values = asdict(rec)
        values.pop("extra")
        values.pop("id")
        values["created_at"] = utc_now()
        values["ok"] = int(bool(values["ok"]))
        for k in ("source", "error_message"):  # a file name that is not UTF-8: its odd bytes kept as \\xNN
            if isinstance(values[k], str):
                values[k] = values[k].encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        for k in _JSON_COLUMNS:
            values[k] = json.dumps(values[k], sort_keys=True) if values[k] is not None else None
        c = self._conn
        try:
            c.execute("BEGIN IMMEDIATE")
            try:
                if rec.image_sha256 is not None and rec.error_code not in RETRYABLE_ERRORS:
                    existing = self.lookup(rec.image_sha256, rec.manifest_sha256, rec.artifact)
                    if existing is not None:
                        c.execute("COMMIT")
                        return existing, False
                cols = ", ".join(values)
                marks = ", ".join("?" for _ in values)
                cur = c.execute(f"INSERT INTO screenings ({cols}) VALUES ({marks})", tuple(values.values()))
                new_id = int(cur.lastrowid or 0)
                if self.integrity is not None:
                    mac_new_row(c, self.integrity, new_id)
                c.execute("COMMIT")
                if self.integrity is not None:
                    self.integrity.write_anchor(self.path, "store", store_state(c))
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"writing to the result store {self.path} failed: {exc}. Nothing was recorded for "
                             f"this image; free disk space or fix permissions, then restart") from exc
        return replace(rec, id=new_id, created_at=values["created_at"]), True

    # ------------------------------------------------------------------------------------------- reading
    def rows(self, since: str | None = None, until: str | None = None,
             after_id: int | None = None) -> Iterator[StoredScreening]:
        """Rows in id order; ``since``/``until`` are ISO dates or date-times (UTC unless they say otherwise)."""
        where: list[str] = []
        params: list[str | int] = []
        if since:
            where.append("created_at >= ?")
            params.append(_parse_time(since, "--since"))
        if until:
            where.append("created_at < ?")
            params.append(_parse_time(until, "--until"))
        if after_id is not None:
            where.append("id > ?")
            params.append(after_id)
        sql = "SELECT * FROM screenings" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        try:
            for row in self._conn.execute(sql, params):
                yield StoredScreening.from_row(row)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"reading the result store {self.path} failed: {exc}") from exc

    def count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM screenings").fetchone()[0])

    def integrity_check(self) -> list[str]:
        """``PRAGMA integrity_check``: ``["ok"]`` for a healthy database, else SQLite's list of problems."""
        return [str(r[0]) for r in self._conn.execute("PRAGMA integrity_check").fetchall()]

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class StoreReader:
    """Whether a final screening is stored: a hint only (the writer's own lookup decides). Its connection is
    opened on first use, in the thread that uses it; any failure reads as "not stored"."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def has(self, image_sha256: str, manifest_sha256: str, artifact: str) -> bool:
        try:
            if self._conn is None:
                self._conn = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, timeout=5.0,
                                             check_same_thread=False)
            row = self._conn.execute(f"SELECT 1 FROM screenings WHERE {_FINAL} LIMIT 1",
                                     (image_sha256, manifest_sha256, artifact)).fetchone()
        except sqlite3.Error:
            return False
        return row is not None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


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
            for k in _JSON_COLUMNS:
                d[k] = json.dumps(d[k], sort_keys=True) if d[k] is not None else ""
            writer.writerow({k: _csv_safe(d[k]) for k in columns})
            n += 1
    else:
        raise UsageError(f"export format must be csv or jsonl, got {fmt!r}")
    return n


def _csv_safe(value: Any) -> Any:
    """Neutralise spreadsheet formula injection in free-text cells (a file name starting with '=')."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value
