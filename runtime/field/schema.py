"""The result store's schema, its versions and the migrations between them (``PRAGMA user_version``).

Version 1: one row per final screening of ``(image_sha256, manifest_sha256, artifact)``.

Version 2 (this kit):

- **The key of a result includes the patient and the eye.** The same photo screened for a second patient (or for
  the other eye) is that patient's own row; version 1 returned the first patient's row and stored nothing for the
  second. The unique index is ``(image_sha256, manifest_sha256, artifact, patient_id, eye)``, with a missing
  patient or eye as the empty text so that two screenings without a patient still count as one.
- **Task, DICOM and segmentation columns**: ``task`` (``classification`` | ``segmentation``; NULL in rows
  written by version 1, which were all classifications), ``study_instance_uid`` and ``laterality`` (from a DICOM
  input), ``biomarkers`` (JSON: vessel density, fractal dimension), ``mask_path`` and ``overlay_path`` (the
  segmentation's PNGs).

A new store is created as version 1 and migrated in the same transaction, so the migration path is the one every
store takes. Migration adds columns (NULL in old rows) and replaces the unique index; it never rewrites a row.
Keyed row macs (runtime/field/integrity.py) are computed over a row's columns leaving out the
:data:`ADDED_COLUMNS` that are NULL, so the macs of rows written before a migration still verify after it.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ...errors import StoreError

STORE_SCHEMA_VERSION = 2

SCHEMA_V1 = (
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

# columns added after version 1, in order: (name, SQL type)
ADDED_COLUMNS: tuple[tuple[str, str], ...] = (
    ("task", "TEXT"), ("study_instance_uid", "TEXT"), ("laterality", "TEXT"), ("biomarkers", "TEXT"),
    ("mask_path", "TEXT"), ("overlay_path", "TEXT"))
ADDED_NAMES = frozenset(name for name, _ in ADDED_COLUMNS)

MIGRATE_V1_V2 = (
    *(f"ALTER TABLE screenings ADD COLUMN {name} {kind}" for name, kind in ADDED_COLUMNS),
    "DROP INDEX screenings_once",
    """CREATE UNIQUE INDEX screenings_once_v2 ON screenings
        (image_sha256, manifest_sha256, artifact, IFNULL(patient_id, ''), IFNULL(eye, ''))
        WHERE image_sha256 IS NOT NULL AND (error_code IS NULL OR error_code NOT IN ('internal-error'))""",
)
MIGRATIONS: dict[int, tuple[str, ...]] = {1: MIGRATE_V1_V2}  # from version N to N + 1

# A final screening of these image bytes under this bundle and artifact, for this patient and eye (an internal
# error is not final). A missing patient or eye is compared as '', as in the unique index.
FINAL_WHERE = ("image_sha256 = ? AND manifest_sha256 = ? AND artifact = ? AND IFNULL(patient_id, '') = ? AND "
               "IFNULL(eye, '') = ? AND (error_code IS NULL OR error_code NOT IN ('internal-error'))")


def final_params(image_sha256: str, manifest_sha256: str, artifact: str, patient_id: str | None,
                 eye: str | None) -> tuple[str, str, str, str, str]:
    return image_sha256, manifest_sha256, artifact, patient_id or "", eye or ""


def mac_columns(row: dict[str, object]) -> dict[str, object]:
    """The columns a row's keyed mac covers: all, less the added columns that are NULL (so that a migration,
    which adds NULL columns, changes no mac; a value written into one of them later does change it)."""
    return {k: v for k, v in row.items() if not (k in ADDED_NAMES and v is None)}


def _in_transaction(c: sqlite3.Connection, statements: tuple[str, ...], expect: int, new: int) -> bool:
    """Run ``statements`` and set the version to ``new`` if the store is still at ``expect`` (another process may
    have done it first); True when this call did it."""
    c.execute("BEGIN IMMEDIATE")
    try:
        if c.execute("PRAGMA user_version").fetchone()[0] != expect:
            c.execute("COMMIT")
            return False
        for statement in statements:
            c.execute(statement)
        c.execute(f"PRAGMA user_version = {new}")
        c.execute("COMMIT")
        return True
    except BaseException:
        if c.in_transaction:
            c.execute("ROLLBACK")
        raise


def ensure_schema(c: sqlite3.Connection, path: Path, migrate: bool = True) -> int:
    """Create the schema in an empty store or migrate an older one to :data:`STORE_SCHEMA_VERSION`; refuse a
    newer one. Returns the version the store had when opened (0: new). ``migrate=False`` (``results verify``)
    leaves an older store as it is."""
    found = int(c.execute("PRAGMA user_version").fetchone()[0])
    if found > STORE_SCHEMA_VERSION:
        raise StoreError(f"{path} was written by a newer fundus-edge (store schema {found}, this kit reads "
                         f"{STORE_SCHEMA_VERSION}); upgrade fundus-edge on this device")
    if not migrate:
        return found
    if found == 0:
        create = SCHEMA_V1 + tuple(s for v in range(1, STORE_SCHEMA_VERSION) for s in MIGRATIONS[v])
        _in_transaction(c, create, 0, STORE_SCHEMA_VERSION)
        return 0
    for version in range(found, STORE_SCHEMA_VERSION):
        _in_transaction(c, MIGRATIONS[version], version, version + 1)
    return found
