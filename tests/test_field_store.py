"""The result store (SQLite) and the audit log: no bundle needed, so these run in a second or two."""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import sqlite3
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from fundus_edge.errors import StoreError, UsageError
from fundus_edge.runtime.field.audit import AuditLog, verify_audit_log
from fundus_edge.runtime.field.store import (
    EXPORT_COLUMNS,
    STORE_SCHEMA_VERSION,
    ResultStore,
    StoredScreening,
    export_rows,
    normalize_eye,
    validate_patient_id,
)


def _rec(sha: str | None = "a" * 64, **kw: object) -> StoredScreening:
    base = StoredScreening(id=0, created_at="", image_sha256=sha, source="/in/x.jpg", bundle_id="b-1",
                           manifest_sha256="m" * 64, artifact="onnx-int8", ok=True, timings_ms={"infer": 1.5},
                           kit_version="0.1.0", decision="no-refer", probability=0.1, threshold=0.2,
                           fov={"found": True}, patient_id="P-1", eye="left")
    return replace(base, **kw)  # type: ignore[arg-type]


def test_store_pragmas_schema_and_permissions(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "r.db"
    with ResultStore(db) as s:
        c = s._conn
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert c.execute("PRAGMA user_version").fetchone()[0] == STORE_SCHEMA_VERSION == 2
        cols = [r[1] for r in c.execute("PRAGMA table_info(screenings)")]
        assert set(EXPORT_COLUMNS) == set(cols)
        assert s.integrity_check() == ["ok"]
    assert stat.S_IMODE(db.stat().st_mode) == 0o600  # patient data


def test_idempotent_add_and_retryable_errors(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "r.db") as s:
        first, inserted = s.add(_rec())
        assert inserted and first.id == 1 and first.created_at.endswith("Z")
        again, inserted2 = s.add(_rec(probability=0.9))  # same image, bundle, artifact: the stored row wins
        assert not inserted2 and again.id == 1 and again.probability == pytest.approx(0.1)
        other_artifact, ins3 = s.add(_rec(artifact="onnx-fp32"))
        assert ins3 and other_artifact.id == 2
        assert s.add(_rec(manifest_sha256="n" * 64))[1]  # another bundle: screened again
        # unreadable files (no hash) and internal errors are recorded every time
        for _ in range(2):
            assert s.add(_rec(sha=None, ok=False, decision=None, error_code="not-found", error_message="x"))[1]
            assert s.add(_rec(sha="c" * 64, ok=False, decision=None, error_code="internal-error",
                              error_message="boom"))[1]
        assert s.lookup("c" * 64, "m" * 64, "onnx-int8") is None  # internal errors may be retried
        # a final error result is idempotent like any other
        assert s.add(_rec(sha="d" * 64, ok=False, decision=None, error_code="decode-failed"))[1]
        assert not s.add(_rec(sha="d" * 64, ok=False, decision=None, error_code="decode-failed"))[1]
        assert s.count() == 8
        with pytest.raises(sqlite3.IntegrityError):  # the index itself refuses a duplicate
            cols = ", ".join(c for c in EXPORT_COLUMNS if c != "id")
            s._conn.execute(f"INSERT INTO screenings ({cols}) SELECT {cols} FROM screenings WHERE id = 1")


def test_records_are_immutable(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "r.db") as s:
        s.add(_rec())
        for sql in ("UPDATE screenings SET decision = 'refer'", "DELETE FROM screenings"):
            with pytest.raises(sqlite3.DatabaseError, match="immutable"):
                s._conn.execute(sql)
        assert s.rows().__next__().decision == "no-refer"


def test_quality_and_ungradable_fit_the_schema(tmp_path: Path) -> None:
    # The quality gate (issue 8) adds a decision value and a quality dict: no schema change needed.
    with ResultStore(tmp_path / "r.db") as s:
        row, _ = s.add(_rec(decision="ungradable", probability=None, quality={"gradable": False, "score": 0.2}))
        back = next(s.rows())
        assert back.decision == "ungradable" and back.quality == {"gradable": False, "score": 0.2}
        assert back.probability is None and back.id == row.id


def test_export_csv_jsonl_since_after_id_and_redaction(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "r.db") as s:
        for i in range(5):
            s.add(_rec(sha=f"{i:064x}", source=f"=cmd|{i}.jpg" if i == 0 else f"/in/{i}.jpg"))
        rows = list(s.rows())
        cut = rows[2].created_at
        buf = io.StringIO()
        assert export_rows(s.rows(since=cut), buf, "jsonl") == 3
        docs = [json.loads(line) for line in buf.getvalue().splitlines()]
        assert [d["id"] for d in docs] == [3, 4, 5] and docs[0]["patient_id"] == "P-1"
        assert docs[0]["timings_ms"] == {"infer": 1.5}
        buf = io.StringIO()
        assert export_rows(s.rows(after_id=4), buf, "csv", include_patient=False) == 1
        table = list(csv.DictReader(io.StringIO(buf.getvalue())))
        assert [r["id"] for r in table] == ["5"] and "patient_id" not in table[0] and "eye" not in table[0]
        buf = io.StringIO()
        export_rows(s.rows(until=cut), buf, "csv")
        table = list(csv.DictReader(io.StringIO(buf.getvalue())))
        assert [r["id"] for r in table] == ["1", "2"]
        assert table[0]["source"] == "'=cmd|0.jpg"  # no spreadsheet formula injection
        assert json.loads(table[0]["fov"]) == {"found": True}
        assert list(s.rows(since="2999-01-01")) == []
        with pytest.raises(UsageError, match="ISO"):
            list(s.rows(since="last tuesday"))


def test_refuses_bad_files_and_newer_schema(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable"):
        ResultStore(junk)
    newer = tmp_path / "newer.db"
    ResultStore(newer).close()
    c = sqlite3.connect(newer)
    c.execute("PRAGMA user_version = 99")
    c.close()
    with pytest.raises(StoreError, match="newer fundus-edge"):
        ResultStore(newer)
    with pytest.raises(StoreError, match="does not exist"):
        ResultStore(tmp_path / "missing.db", create=False)


def test_patient_field_validation() -> None:
    assert normalize_eye("OD") == "right" and normalize_eye("os") == "left" and normalize_eye("L") == "left"
    assert normalize_eye(None) is None
    with pytest.raises(UsageError):
        normalize_eye("both")
    assert validate_patient_id("  MRN-0042/7 ") == "MRN-0042/7"
    for bad in ("", "x" * 65, "a\nb", "a;DROP TABLE"):
        with pytest.raises(UsageError):
            validate_patient_id(bad)
    assert "P-1" not in repr(_rec())  # patient fields stay out of reprs


def _writer(db: str, start: int) -> None:
    with ResultStore(db) as s:
        for i in range(40):
            s.add(_rec(sha=f"{(start + i) % 60:064x}"))  # the two writers overlap on 20 images


def test_two_processes_never_duplicate(tmp_path: Path) -> None:
    db = str(tmp_path / "r.db")
    ResultStore(db).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(db, s)) for s in (0, 20)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with ResultStore(db) as s:
        shas = [r.image_sha256 for r in s.rows()]
        assert len(shas) == 60 and len(set(shas)) == 60
        assert s.integrity_check() == ["ok"]


# ------------------------------------------------------------------------------------------------ audit
def test_audit_chain_and_tamper_evidence(tmp_path: Path) -> None:
    log = tmp_path / "a" / "audit.jsonl"
    with AuditLog(log) as a:
        for i in range(5):
            a.record("image-error", code="decode-failed", n=i)
    assert stat.S_IMODE(log.stat().st_mode) == 0o600
    check = verify_audit_log(log)
    assert check and check.entries == 5
    lines = log.read_bytes().splitlines(keepends=True)
    assert [json.loads(x)["seq"] for x in lines] == [1, 2, 3, 4, 5]
    edited = lines[2].replace(b"decode-failed", b"decode-failez")
    log.write_bytes(b"".join([*lines[:2], edited, *lines[3:]]))
    bad = verify_audit_log(log)
    assert not bad and "line 4" in bad.problems[0]
    log.write_bytes(b"".join([*lines[:1], *lines[2:]]))  # a deleted entry
    assert not verify_audit_log(log)


def test_audit_torn_tail_is_closed_and_chained(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    with AuditLog(log) as a:
        a.record("session-stop", reason="x")
    with open(log, "ab") as fh:
        fh.write(b'{"seq":2,"event":"image-er')  # a writer killed mid-line
    with AuditLog(log) as a:
        entry = a.record("bundle-loaded", bundle_id="b")
    assert entry["seq"] == 2
    check = verify_audit_log(log)
    assert check, check.problems
    assert check.damaged_lines == [2] and check.entries == 2


def test_audit_refuses_patient_fields_and_key_material(tmp_path: Path) -> None:
    with AuditLog(tmp_path / "audit.jsonl") as a:
        for bad in ({"patient_id": "P"}, {"eye": "left"}, {"detail": {"patient_id": "P"}},
                    {"blob": b"\xff\xd8"}, {"note": "-----BEGIN PRIVATE KEY-----"}):
            with pytest.raises(ValueError):
                a.record("x", **bad)
    assert (tmp_path / "audit.jsonl").read_bytes() == b""


def _appender(path: str, n: int) -> None:
    with AuditLog(path, fsync=False) as a:
        for i in range(n):
            a.record("image-error", code="decode-failed", i=i)


def test_audit_concurrent_appenders_keep_the_chain(tmp_path: Path) -> None:
    log = str(tmp_path / "audit.jsonl")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_appender, args=(log, 60)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    check = verify_audit_log(log)
    assert check and check.entries == 120, check.problems
    seqs = [json.loads(x)["seq"] for x in Path(log).read_text().splitlines()]
    assert seqs == list(range(1, 121))
