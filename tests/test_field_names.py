"""File names that are not UTF-8 or carry ANSI escapes: escaped in text output, preserved in JSON, stored."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fundus_edge.cli import main


def test_latin1_and_ansi_names(built: Any, tmp_path: Path, real_photos: list[Path],
                               capsys: pytest.CaptureFixture[str]) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    latin1 = os.fsdecode(b"caf\xe9-OD.jpg")  # a Latin-1 name: not valid UTF-8
    ansi = "\x1b[2J\x1b[31mclear-screen.jpg"
    for name, photo in ((latin1, real_photos[0]), (ansi, real_photos[1])):  # distinct images: none is a repeat
        (inbox / name).write_bytes(photo.read_bytes())
    db = tmp_path / "r.db"
    assert main(["screen", "--bundle", str(built.out), "--store", str(db), str(inbox)]) == 0
    text = capsys.readouterr().out
    assert "\x1b" not in text and "caf\\xe9-OD.jpg" in text and "\\x1b[31mclear-screen.jpg" in text
    assert main(["screen", "--bundle", str(built.out), "--store", str(tmp_path / "r2.db"), str(inbox), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {Path(r["source"]).name for r in doc["results"]} == {latin1, ansi}  # preserved exactly
    with sqlite3.connect(db) as con:
        stored = {Path(s).name for (s,) in con.execute("SELECT source FROM screenings")}
    assert stored == {"caf\\xe9-OD.jpg", ansi}
