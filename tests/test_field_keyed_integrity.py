"""Keyed integrity of the store and the audit log (device key outside the store): `results verify` detects an
edited row (triggers dropped first), a deleted row, a deleted or re-created store, and a cut audit tail; a store
that the device recorded rows in is not silently started afresh."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest

from fundus_edge.cli import main
from fundus_edge.errors import StoreError


def _verify(db: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any] | str]:
    capsys.readouterr()
    code = main(["results", "verify", "--store", str(db), "--json"])
    out = capsys.readouterr()
    try:  # the report comes first; on failure an error document follows it
        return code, json.JSONDecoder().raw_decode(out.out)[0]
    except ValueError:
        return code, out.err


def _sql(db: Path, *statements: str) -> None:
    con = sqlite3.connect(db)
    try:
        for statement in statements:
            con.execute(statement)
        con.commit()
    finally:
        con.close()  # the WAL is checkpointed and removed: the file alone is the store


def _restore(src: Path, db: Path) -> None:
    for extra in (db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        extra.unlink(missing_ok=True)
    shutil.copy(src, db)


def test_results_verify_detects_edits_deletions_and_cut_audit(built: Any, tmp_path: Path, real_photos: list[Path],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "r.db"
    assert main(["screen", "--bundle", str(built.out), "--store", str(db), *map(str, real_photos[:3]), "--json"]) == 0
    state = Path(os.environ["FUNDUS_EDGE_STATE_DIR"])
    key = state / "device.key"
    assert key.stat().st_size == 32 and stat.S_IMODE(key.stat().st_mode) == 0o600
    assert not (db.parent / "device.key").exists()  # the key is not kept next to the store
    code, doc = _verify(db, capsys)
    assert code == 0 and isinstance(doc, dict) and doc["keyed"]["problems"] == [] and doc["rows"] == 3
    pristine = tmp_path / "pristine.db"
    shutil.copy(db, pristine)

    # 1. a row edited with sqlite3, its triggers dropped first
    _sql(db, "DROP TRIGGER screenings_immutable_update",
         "UPDATE screenings SET decision = CASE decision WHEN 'refer' THEN 'no-refer' ELSE 'refer' END WHERE id = 2")
    code, doc = _verify(db, capsys)
    assert code == StoreError.exit_code and isinstance(doc, dict) and not doc["ok"]
    assert any("row 2" in p for p in doc["keyed"]["problems"])

    # 2. the last row deleted (with its mac, so that the chain itself looks whole)
    _restore(pristine, db)
    _sql(db, "DROP TRIGGER screenings_immutable_delete", "DELETE FROM screenings WHERE id = 3",
         "DELETE FROM row_macs WHERE id = 3")
    code, doc = _verify(db, capsys)
    assert code == StoreError.exit_code and isinstance(doc, dict)
    assert any("deleted" in p or "anchor" in p for p in doc["keyed"]["problems"])

    # 3. the audit log's tail cut
    _restore(pristine, db)
    assert _verify(db, capsys)[0] == 0
    log = tmp_path / "r.audit.jsonl"
    full = log.read_bytes()
    log.write_bytes(b"".join(full.splitlines(keepends=True)[:-2]))
    code, doc = _verify(db, capsys)
    assert code == StoreError.exit_code and isinstance(doc, dict)
    assert any("tail was cut" in p for p in doc["keyed"]["problems"])
    log.write_bytes(full)

    # 4. the store deleted: verify fails, and screening refuses to start a fresh, empty one in its place
    for f in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        f.unlink(missing_ok=True)
    assert _verify(db, capsys)[0] == StoreError.exit_code
    capsys.readouterr()
    assert main(["screen", "--bundle", str(built.out), "--store", str(db), str(real_photos[0])]) == \
        StoreError.exit_code
    assert "recorded 3 rows" in capsys.readouterr().err and not db.exists()

    # 5. ... or a store re-created by hand with other rows
    _sql(pristine, "DROP TRIGGER screenings_immutable_delete", "DELETE FROM screenings", "DELETE FROM row_macs")
    _restore(pristine, db)
    code, doc = _verify(db, capsys)
    assert code == StoreError.exit_code
    assert main(["screen", "--bundle", str(built.out), "--store", str(db), str(real_photos[0])]) == \
        StoreError.exit_code
