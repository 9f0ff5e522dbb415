"""The durable offline result store: one SQLite file holding every screening made on the device.

Durability: WAL journal with ``synchronous=FULL``. In WAL mode FULL syncs the WAL on every commit, so a
screening that was reported (and a file moved away afterwards) survives a power cut, which on a handheld
running on a battery is an event, not a corner case. ``NORMAL`` would keep the database consistent but may
roll back the last commits after a power loss; its saving (one fsync per screening, about 1-5 ms on an SD
card) is small next to a screening (decode + inference, 50-500 ms on a Raspberry Pi), so FULL it is.

Idempotency: a screening is keyed by ``(image_sha256, manifest_sha256, artifact, patient_id, eye)``: the same
image bytes under the same bundle and model file, for the same patient and eye, are screened once; asking again
returns the stored row. The same photo screened for another patient (or eye) is that patient's own row. A unique
index enforces it, so two processes writing the same store cannot duplicate a result either. Two exceptions, both
without a usable key: files that could not be read (no sha256) and ``internal-error`` results, which are
recorded every time they happen and may be retried.

Records are immutable: triggers refuse UPDATE and DELETE on ``screenings``. ``decision`` is free text
(``refer``, ``no-refer``, and the quality gate's ``ungradable``) and ``quality`` a nullable JSON column, so
the quality gate adds values, not columns. The schema, its version (``PRAGMA user_version``) and the migration
of older stores are in runtime/field/schema.py; a store written by a newer kit is refused rather than guessed at.
A row (:class:`StoredScreening`) and export are in runtime/field/records.py.

The file is created ``0600``: it holds patient data.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from types import TracebackType

from ...errors import StoreError, UsageError
from .audit import utc_now
from .integrity import ROW_MACS_SCHEMA, Integrity, check_store_anchor, mac_new_row, store_state
from .records import (  # noqa: F401  (re-exported: the store's public names)
    EXPORT_COLUMNS,
    JSON_COLUMNS,
    PATIENT_COLUMNS,
    StoredScreening,
    export_file,
    export_rows,
    normalize_eye,
    validate_patient_id,
)
from .schema import FINAL_WHERE, STORE_SCHEMA_VERSION, ensure_schema, final_params  # noqa: F401

SYNCHRONOUS = "FULL"
RETRYABLE_ERRORS = ("internal-error",)


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
                 integrity: Integrity | None = None, migrate: bool = True) -> None:
        self.path = Path(path)
        self._migrate = migrate  # an older schema is migrated on open (not by ``results verify``)
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
        self.opened_version = ensure_schema(c, self.path, self._migrate)  # the version found (0: created now)

    # ------------------------------------------------------------------------------------------- writing
    def lookup(self, image_sha256: str, manifest_sha256: str, artifact: str, patient_id: str | None = None,
               eye: str | None = None) -> StoredScreening | None:
        """The stored, final screening of these image bytes under this bundle and artifact for this patient and
        eye (None: none given), if any."""
        try:
            row = self._conn.execute(f"SELECT * FROM screenings WHERE {FINAL_WHERE} ORDER BY id LIMIT 1",
                                     final_params(image_sha256, manifest_sha256, artifact, patient_id, eye)
                                     ).fetchone()
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
        for k in JSON_COLUMNS:
            values[k] = json.dumps(values[k], sort_keys=True) if values[k] is not None else None
        c = self._conn
        try:
            c.execute("BEGIN IMMEDIATE")
            try:
                if rec.image_sha256 is not None and rec.error_code not in RETRYABLE_ERRORS:
                    existing = self.lookup(rec.image_sha256, rec.manifest_sha256, rec.artifact, rec.patient_id,
                                           rec.eye)
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

    def has(self, image_sha256: str, manifest_sha256: str, artifact: str, patient_id: str | None = None,
            eye: str | None = None) -> bool:
        try:
            if self._conn is None:
                self._conn = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True, timeout=5.0,
                                             check_same_thread=False)
            row = self._conn.execute(f"SELECT 1 FROM screenings WHERE {FINAL_WHERE} LIMIT 1",
                                     final_params(image_sha256, manifest_sha256, artifact, patient_id, eye)
                                     ).fetchone()
        except sqlite3.Error:
            return False
        return row is not None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


