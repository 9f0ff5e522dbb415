"""Field cases of issue 14 (items 6 and 10) at benchmark sizes, run through the command line as a device would:
patients (the same photos screened for several patients), partial files of every format watch mode accepts
(written in two halves with a pause), and a camera card's subfolders with odd names. Used by
benchmarks/field_reliability.py; the tests run the same ideas small (tests/test_field_patients.py,
tests/test_field_watch_formats.py)."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from reliability import _cli
from test_field_watch_formats import dicom_photo, jpeg_with_thumbnail

Log = Callable[[str], None]


def _photos(src: list[Path], n: int, side: int = 320) -> list[Image.Image]:
    """``n`` distinct photographs from real ones: an 8x8 block of its own colour in each (a single pixel can vanish
    in JPEG quantisation and leave two files with the same bytes)."""
    out = []
    for i in range(n):
        img = Image.open(src[i % len(src)]).convert("RGB")
        img.thumbnail((side, side))
        x, y = 8 * (i % 16), 8 * (i // 16 % 8)
        img.paste((40 + i * 37 % 200, 40 + i * 91 % 200, 40 + i // 200 % 200), (x, y, x + 8, y + 8))
        out.append(img)
    return out


def _env(work: Path) -> dict[str, str]:
    """The subprocesses' environment: their own state directory (device key, anchors) under ``work``, so that a
    benchmark neither writes into the user's state nor meets the anchors of an earlier run's deleted stores."""
    return {**os.environ, "FUNDUS_EDGE_STATE_DIR": str(work / "state")}


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def run_patients_case(bundle: Path, work: Path, real: list[Path], n_photos: int = 20, n_patients: int = 5,
                      log: Log = lambda s: None) -> dict[str, Any]:
    """Every photo screened for every patient (IDs from a file), then everything again: rows, repeats, verify."""
    t0 = time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    files = []
    for i, img in enumerate(_photos(real, n_photos)):
        files.append(work / f"p{i:03d}.jpg")
        img.save(files[-1], "JPEG", quality=90)
    db = work / "patients.db"
    for rnd in range(2):
        for k in range(n_patients):
            pid = work / f"pid{k}"
            pid.write_text(f"MRN-{k:04d}\n")
            subprocess.run(_cli("screen", "--bundle", str(bundle), "--store", str(db), "--patient-id-file",
                                str(pid), *map(str, files)), capture_output=True, timeout=900, check=False,
                           env=_env(work))
        log(f"patients: round {rnd + 1} done")
    rows = _rows(db, "SELECT image_sha256, patient_id FROM screenings")
    verify = subprocess.run(_cli("results", "verify", "--store", str(db), "--json"), capture_output=True, text=True,
                            timeout=300, check=False, env=_env(work))
    return {"photos": n_photos, "patients": n_patients, "rows": len(rows), "expected_rows": n_photos * n_patients,
            "distinct_photo_patient": len(set(rows)), "verify_ok": verify.returncode == 0,
            "seconds": round(time.monotonic() - t0, 1)}


def _formats(img: Image.Image, i: int) -> list[tuple[str, bytes, int]]:
    """(name, bytes, where the writer pauses) for each format watch mode accepts."""
    def enc(fmt: str, **kw: Any) -> bytes:
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    thumb, after_thumb = jpeg_with_thumbnail(img)
    out = [(f"{i:03d}.webp", enc("WEBP", quality=85)), (f"{i:03d}.tif", enc("TIFF")),
           (f"{i:03d}.bmp", enc("BMP")), (f"{i:03d}.png", enc("PNG")), (f"{i:03d}.dcm", dicom_photo(img))]
    return [(n, d, len(d) // 2) for n, d in out] + [(f"{i:03d}.jpg", thumb, after_thumb)]


def run_partial_case(bundle: Path, work: Path, real: list[Path], n_each: int = 10, seed: int = 0,
                     log: Log = lambda s: None) -> dict[str, Any]:
    """A watcher (``--after move``) while a writer writes ``n_each`` files of each format in two halves with a
    random 0.5-1.5 s pause: screened, errors, files parked in failed/, and decode failures retried."""
    rng = random.Random(seed)
    t0 = time.monotonic()
    inbox, done, db = work / "inbox", work / "done", work / "partial.db"
    inbox.mkdir(parents=True, exist_ok=True)
    jobs = [job for i, img in enumerate(_photos(real, n_each)) for job in _formats(img, i)]
    out_file = work / "watch.jsonl"  # a file, not a pipe: an unread pipe fills up and blocks the watcher's prints
    with open(out_file, "w") as out_fh:
        proc = subprocess.Popen(_cli("screen", "--bundle", str(bundle), "--store", str(db), "--watch", str(inbox),
                                     "--after", "move", "--move-to", str(done), "--settle", "0.3", "--poll", "0.1",
                                     "--json"), stdout=out_fh, stderr=subprocess.DEVNULL, text=True,
                                env=_env(work))
    for name, data, cut in jobs:
        with open(inbox / name, "wb") as fh:
            fh.write(data[:cut])
            fh.flush()
            time.sleep(rng.uniform(0.5, 1.5))
            fh.write(data[cut:])
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None and \
            len([p for p in done.glob("**/*") if p.is_file()]) < len(jobs):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    out = out_file.read_text()
    summary = next((json.loads(x)["summary"] for x in out.splitlines() if x.startswith('{"summary"')), {})
    rows = _rows(db, "SELECT ok, error_code FROM screenings")
    failed = sorted(p.name for p in (done / "failed").glob("*")) if (done / "failed").exists() else []
    r = {"files": len(jobs), "formats": 6, "rows": len(rows), "ok": sum(1 for ok, _ in rows if ok),
         "errors": sum(1 for ok, _ in rows if not ok), "parked_in_failed": len(failed),
         "deferred_retries": summary.get("deferred"), "seconds": round(time.monotonic() - t0, 1)}
    log(f"partial: {r}")
    return r


def run_subfolder_case(bundle: Path, work: Path, real: list[Path], n_folders: int = 5, per_folder: int = 10,
                       log: Log = lambda s: None) -> dict[str, Any]:
    """A camera card: DCIM/1NNCAM folders with ``.JPG``, ``.jpe`` and trailing-space names, plus files that must be
    skipped (hidden, ``.txt``, too deep): taken, skipped and the reasons reported."""
    t0 = time.monotonic()
    card, db = work / "card", work / "card.db"
    imgs = _photos(real, n_folders * per_folder)
    expected = 0
    for f in range(n_folders):
        folder = card / "DCIM" / f"{100 + f}CAM"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(per_folder):
            name = [f"IMG_{j:04d}.JPG", f"IMG_{j:04d}.jpe", f"IMG_{j:04d}.jpg "][j % 3]
            imgs[f * per_folder + j].save(folder / name, "JPEG", quality=90)
            expected += 1
        (folder / "info.txt").write_text("camera notes")
        imgs[f].save(folder / f".IMG_{f:04d}.jpg", "JPEG")
    deep = card / "a" / "b" / "c" / "d"
    deep.mkdir(parents=True)
    imgs[0].save(deep / "deep.jpg", "JPEG")
    proc = subprocess.run(_cli("screen", "--bundle", str(bundle), "--store", str(db), "--watch", str(card),
                               "--settle", "0", "--poll", "0.1", "--exit-when-idle", "--json"), capture_output=True,
                          text=True, timeout=1200, check=False, env=_env(work))
    summary = next((json.loads(x)["summary"] for x in proc.stdout.splitlines() if x.startswith('{"summary"')), {})
    rows = _rows(db, "SELECT COUNT(*), SUM(ok) FROM screenings")[0]
    r = {"expected": expected, "rows": rows[0], "ok": rows[1] or 0, "skipped": summary.get("skipped"),
         "skip_reasons": summary.get("skip_reasons"), "seconds": round(time.monotonic() - t0, 1)}
    log(f"subfolders: {r}")
    return r
