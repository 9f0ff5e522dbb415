"""Patient safety of the result store (issue 14, item 10): the key of a stored result includes the patient and the
eye, stores of schema 1 migrate with their keyed integrity intact, patient IDs come from a file or the environment
instead of argv, and an export that fails midway leaves nothing behind. No bundle needed: these run in seconds."""

from __future__ import annotations

import errno
import io
import json
import os
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fundus_edge.cli import main
from fundus_edge.errors import StoreError, UsageError
from fundus_edge.runtime.field import records
from fundus_edge.runtime.field.integrity import Integrity, keyed_check, mac_new_row, store_state
from fundus_edge.runtime.field.records import PATIENT_ID_ENV, patient_id_from
from fundus_edge.runtime.field.schema import SCHEMA_V1
from fundus_edge.runtime.field.store import STORE_SCHEMA_VERSION, ResultStore, StoredScreening

SECRET = "MRN-7731-PAT"


def _rec(sha: str = "a" * 64, **kw: Any) -> StoredScreening:
    base = StoredScreening(id=0, created_at="", image_sha256=sha, source="/in/x.jpg", bundle_id="b-1",
                           manifest_sha256="m" * 64, artifact="onnx-int8", ok=True, timings_ms={"infer": 1.5},
                           kit_version="0.1.0", decision="no-refer", probability=0.1, threshold=0.2)
    return replace(base, **kw)


def _state() -> Path:
    return Path(os.environ["FUNDUS_EDGE_STATE_DIR"])


def test_a_second_patient_gets_its_own_row(tmp_path: Path) -> None:
    with ResultStore(tmp_path / "r.db", integrity=Integrity.at(_state())) as s:
        first, ins1 = s.add(_rec(patient_id="P-1", eye="left"))
        second, ins2 = s.add(_rec(patient_id="P-2", eye="left", probability=0.7))
        assert ins1 and ins2 and (first.id, second.id) == (1, 2)  # schema 1 returned P-1's row for P-2
        assert second.patient_id == "P-2" and second.probability == pytest.approx(0.7)
        assert s.add(_rec(patient_id="P-1", eye="right"))[1]  # the other eye is its own row too
        again, ins = s.add(_rec(patient_id="P-1", eye="left", probability=0.9))
        assert not ins and again.id == 1 and again.probability == pytest.approx(0.1)  # same context: stored row
        assert s.add(_rec())[1] and not s.add(_rec())[1]  # no patient twice: one row (NULL compared as '')
        looked = s.lookup("a" * 64, "m" * 64, "onnx-int8", "P-2", "left")
        assert looked is not None and looked.id == 2
        assert s.lookup("a" * 64, "m" * 64, "onnx-int8", "P-3", "left") is None
        assert s.count() == 4
        with pytest.raises(sqlite3.IntegrityError):  # the unique index itself holds the patient in the key
            s._conn.execute("INSERT INTO screenings (created_at, image_sha256, source, patient_id, eye, bundle_id, "
                            "manifest_sha256, artifact, ok, timings_ms, kit_version) SELECT created_at, "
                            "image_sha256, source, patient_id, eye, bundle_id, manifest_sha256, artifact, ok, "
                            "timings_ms, kit_version FROM screenings WHERE id = 2")
    assert keyed_check(tmp_path / "r.db", None, _state())["problems"] == []


def _v1_store(db: Path, integrity: Integrity, n: int) -> None:
    """A store as kit schema 1 wrote it: its tables, keyed rows (macs over its 22 columns) and anchor."""
    con = sqlite3.connect(db, isolation_level=None)
    for statement in SCHEMA_V1:
        con.execute(statement)
    con.execute("PRAGMA user_version = 1")
    con.execute("CREATE TABLE row_macs (id INTEGER PRIMARY KEY, mac TEXT NOT NULL)")
    for i in range(n):
        con.execute("BEGIN")
        cur = con.execute("INSERT INTO screenings (created_at, image_sha256, source, patient_id, eye, bundle_id, "
                          "manifest_sha256, artifact, ok, decision, probability, threshold, timings_ms, "
                          "kit_version) VALUES ('2025-01-01T00:00:00.000000Z', ?, ?, 'P-1', 'left', 'b-1', ?, "
                          "'onnx-int8', 1, 'refer', 0.8, 0.2, '{}', '0.0.9')", (f"{i:064x}", f"/in/{i}.jpg", "m" * 64))
        mac_new_row(con, integrity, int(cur.lastrowid or 0))
        con.execute("COMMIT")
    integrity.write_anchor(db, "store", store_state(con))
    con.close()


def test_schema_1_store_migrates_and_its_keyed_integrity_still_verifies(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    db, integrity = tmp_path / "old.db", Integrity.at(_state())
    _v1_store(db, integrity, 3)
    assert keyed_check(db, None, _state())["problems"] == []
    with ResultStore(db, integrity=integrity) as s:  # opening migrates it (a refusal would raise here)
        assert s.opened_version == 1
        assert s._conn.execute("PRAGMA user_version").fetchone()[0] == STORE_SCHEMA_VERSION
        old = list(s.rows())
        assert [r.patient_id for r in old] == ["P-1"] * 3 and all(r.task is None for r in old)
        # the migrated store keys by patient: the same photo for P-2 is P-2's row; for P-1 it is the old row
        new, inserted = s.add(_rec(sha=f"{0:064x}", patient_id="P-2", eye="left", task="classification"))
        assert inserted and new.id == 4
        assert not s.add(_rec(sha=f"{0:064x}", patient_id="P-1", eye="left"))[1]
    assert keyed_check(db, None, _state())["problems"] == []  # old macs and the new row's chain verify
    assert main(["results", "verify", "--store", str(db), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["keyed"]["problems"] == []
    with ResultStore(db) as s:  # opening a migrated store again changes nothing
        assert s.opened_version == STORE_SCHEMA_VERSION and s.count() == 4
    # an edit of a migrated (schema 1) row is still caught, including one made through a new column
    con = sqlite3.connect(db)
    con.execute("DROP TRIGGER screenings_immutable_update")
    con.execute("UPDATE screenings SET laterality = 'R' WHERE id = 2")
    con.commit()
    con.close()
    problems = keyed_check(db, None, _state())["problems"]
    assert any(p.startswith("row 2:") for p in problems)


def test_a_newer_store_is_still_refused(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    ResultStore(db).close()
    con = sqlite3.connect(db)
    con.execute(f"PRAGMA user_version = {STORE_SCHEMA_VERSION + 1}")
    con.close()
    with pytest.raises(StoreError, match="newer fundus-edge"):
        ResultStore(db)


def test_patient_id_from_a_file_or_the_environment(tmp_path: Path) -> None:
    f = tmp_path / "pid.txt"
    f.write_text(f"  {SECRET}\nanything after the first line\n")
    assert patient_id_from(None, f, {}) == SECRET
    assert patient_id_from(None, None, {PATIENT_ID_ENV: SECRET}) == SECRET
    assert patient_id_from("P-9", None, {PATIENT_ID_ENV: SECRET}) == "P-9"  # argv, when given, wins over the env
    assert patient_id_from(None, None, {}) is None
    with pytest.raises(UsageError, match="not both"):
        patient_id_from("P-9", f, {})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UsageError, match="empty"):
        patient_id_from(None, tmp_path / "empty", {})
    os.mkfifo(tmp_path / "fifo")  # never read (it would block): refused like any non-regular file
    with pytest.raises(UsageError, match="patient-id-file"):
        patient_id_from(None, tmp_path / "fifo", {})
    with pytest.raises(UsageError, match="1-64 characters"):
        patient_id_from(None, None, {PATIENT_ID_ENV: "x" * 65})


def test_export_that_fails_midway_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "r.db"
    with ResultStore(db, integrity=Integrity.at(_state())) as s:
        for i in range(40):
            s.add(_rec(sha=f"{i:064x}", patient_id=SECRET))
    out_dir = tmp_path / "exports"
    out_dir.mkdir()
    out = out_dir / "results.csv"
    out.write_text("the previous export\n")
    real = records.export_rows
    written: list[int] = []

    class DiskFull(io.TextIOBase):
        """Writes through to the real file until 2 KiB, then fails as a full disk does."""

        def __init__(self, fh: Any) -> None:
            self.fh, self.n = fh, 0

        def write(self, text: str) -> int:
            if self.n + len(text) > 2048:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.n += len(text)
            written.append(len(text))
            n = int(self.fh.write(text))
            self.fh.flush()  # on disk, in the temporary file, as it would be after a few buffers
            return n

    def failing(rows: Any, fh: Any, fmt: str, include_patient: bool = True) -> int:
        real(rows, DiskFull(fh), fmt, include_patient)
        raise AssertionError("unreachable: the write fails first")

    monkeypatch.setattr(records, "export_rows", failing)
    code = main(["results", "export", "--store", str(db), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == StoreError.exit_code and "nothing was written" in err and "No space left" in err
    assert sum(written) > 1000  # it did fail midway, with rows (patient IDs) already written to disk
    assert sorted(p.name for p in out_dir.iterdir()) == ["results.csv"]  # no .tmp with patient IDs left behind
    assert out.read_text() == "the previous export\n"  # and the previous export is untouched
    monkeypatch.setattr(records, "export_rows", real)
    assert main(["results", "export", "--store", str(db), "--out", str(out)]) == 0
    assert out.read_text().count(SECRET) == 40 and sorted(p.name for p in out_dir.iterdir()) == ["results.csv"]
