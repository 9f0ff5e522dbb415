"""Watch mode never blocks on one file: an image too large for the device is a recorded error (under the device's
memory cap), and a file that stopped the screener is retried once, then quarantined."""

from __future__ import annotations

import io
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image
from test_field_decode_limits import big_png

from fundus_edge.devices import resolve_device
from fundus_edge.runtime.field.session import Patient, open_session
from fundus_edge.runtime.field.store import ResultStore
from fundus_edge.runtime.field.watch import INFLIGHT_SUFFIX, QUARANTINE_AFTER, Watcher, WatchOptions


def _good_files(src: Path, inbox: Path, n: int) -> list[str]:
    """``n`` distinct small JPEGs (one pixel differs) made from a real fundus photograph."""
    base = Image.open(src).convert("RGB")
    base.thumbnail((320, 320))
    names = []
    for i in range(n):
        img = base.copy()
        img.putpixel((i % img.width, 0), (i, 255 - i, 7))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        name = f"good-{i:03d}.jpg"
        (inbox / name).write_bytes(buf.getvalue())
        names.append(name)
    return names


def test_huge_16bit_png_in_front_of_50_files_under_the_pi4_memory_cap(built: Any, tmp_path: Path,
                                                                     real_photos: list[Path]) -> None:
    inbox, db = tmp_path / "inbox", tmp_path / "r.db"
    inbox.mkdir()
    big_png(inbox / "000-huge16.png")  # 8900x8900 16-bit RGB: ~0.2 MB on disk, 0.5-0.8 GB decoded
    assert (inbox / "000-huge16.png").stat().st_size < 1 << 20
    good = _good_files(real_photos[0], inbox, 50)
    profile = resolve_device("rpi4")
    ram = min(profile.memory.ram_mb) << 20  # the 1 GB board: RLIMIT_AS as devices/caps.py's rlimit cap does
    cores = set(sorted(os.sched_getaffinity(0))[:4])  # a Pi 4 has 4 cores

    # the cap is set in the child before anything is imported (no preexec_fn: unsafe with threads)
    launcher = ("import os, resource, runpy, sys; "
                f"resource.setrlimit(resource.RLIMIT_AS, ({ram}, {ram})); os.sched_setaffinity(0, {sorted(cores)}); "
                "sys.argv = ['fundus-edge'] + sys.argv[1:]; runpy.run_module('fundus_edge', run_name='__main__')")
    cmd = [sys.executable, "-c", launcher, "screen", "--bundle", str(built.out), "--device", "rpi4", "--format",
           "onnx", "--watch", str(inbox), "--store", str(db), "--settle", "0", "--poll", "0.1", "--exit-when-idle",
           "--json"]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170)
    wall = time.monotonic() - t0
    assert proc.returncode in (0, 10), proc.stderr[-2000:]
    with sqlite3.connect(db) as con:
        rows = dict(con.execute("SELECT source, COALESCE(error_code, decision) FROM screenings").fetchall())
        huge_message = con.execute("SELECT error_message FROM screenings WHERE source LIKE '%huge16.png'").fetchone()
    by_name = {Path(k).name: v for k, v in rows.items()}
    assert by_name["000-huge16.png"] == "too-large"
    assert "budget" in huge_message[0]  # refused from its header, before decoding (not a MemoryError mid-decode)
    assert all(by_name.get(n) in ("refer", "no-refer", "ungradable") for n in good), by_name
    assert sum(1 for n in good if n in by_name) == 50
    assert wall < 170


def test_a_file_that_stopped_the_screener_is_retried_once_then_quarantined(built: Any, tmp_path: Path,
                                                                          real_photos: list[Path]) -> None:
    inbox, db = tmp_path / "inbox", tmp_path / "r.db"
    inbox.mkdir()
    a, b = (inbox / n for n in _good_files(real_photos[1], inbox, 2))
    journal = Path(str(db) + INFLIGHT_SUFFIX)

    def crashed_on(p: Path, attempts: int) -> None:  # what a run killed while screening p leaves behind
        st = p.stat()
        journal.write_text(json.dumps({"path": str(p), "key": [st.st_size, st.st_mtime_ns, st.st_ino],
                                       "attempts": attempts}))

    def watch() -> dict[str, Any]:
        with ResultStore(db) as store, open_session(built.out, store=store, mode="watch") as session:
            opts = WatchOptions(directory=inbox, poll_s=0.05, settle_s=0.0, exit_when_idle=True)
            Watcher(session, opts, Patient(), keep_results=True).run()
        with sqlite3.connect(db) as con:
            return {Path(s).name: (e, m) for s, e, m in
                    con.execute("SELECT source, error_code, error_message FROM screenings")}

    crashed_on(a, 1)  # one crash: retried, and screened this time
    rows = watch()
    assert rows[a.name][0] is None and rows[b.name][0] is None
    assert not journal.exists()

    c = inbox / "c.jpg"
    Image.open(a).save(c, "JPEG", quality=60)  # another image
    crashed_on(c, QUARANTINE_AFTER)  # it stopped the screener twice: quarantined, not tried a third time
    d = inbox / "d.jpg"
    Image.open(a).save(d, "JPEG", quality=70)
    rows = watch()
    assert rows[c.name][0] == "internal-error" and "quarantined" in rows[c.name][1]
    assert rows[d.name][0] is None  # and the queue went on
    assert not journal.exists()


def test_watch_takes_camera_subfolders_and_records_skipped_files(built: Any, tmp_path: Path,
                                                                 real_photos: list[Path]) -> None:
    inbox, db, done = tmp_path / "inbox", tmp_path / "r.db", tmp_path / "inbox" / "done"
    cam = inbox / "DCIM" / "100CAM"
    cam.mkdir(parents=True)
    names = _good_files(real_photos[2], cam, 2)
    (cam / "notes.txt").write_text("not an image")
    (inbox / ".trash").mkdir()
    (inbox / ".trash" / "old.jpg").write_bytes((cam / names[0]).read_bytes())
    audit_path = tmp_path / "audit.jsonl"
    from fundus_edge.runtime.field.audit import AuditLog

    with ResultStore(db) as store, AuditLog(audit_path) as audit, \
            open_session(built.out, store=store, audit=audit, mode="watch") as session:
        opts = WatchOptions(directory=inbox, after="move", move_to=done, poll_s=0.05, settle_s=0.0,
                            exit_when_idle=True)
        summary = Watcher(session, opts, Patient(), keep_results=True).run()
    assert summary.screened == 2 and summary.errors == 0 and summary.skipped == 2
    assert summary.skip_reasons == {"hidden folder": 1, "not an image suffix": 1}  # every file not taken, and why
    assert sorted(p.name for p in done.iterdir()) == sorted(names)  # moved out, and not taken again from done/
    assert (inbox / ".trash" / "old.jpg").exists()  # hidden folders are not entered
    skipped = [json.loads(x) for x in audit_path.read_text().splitlines() if '"watch-skipped"' in x]
    assert sorted((e["reason"], e["suffix"]) for e in skipped) == [("hidden folder", ""),
                                                                   ("not an image suffix", ".txt")]
    assert "notes" not in audit_path.read_text()  # names never go into the audit log
