"""Watch mode and every format it accepts (issue 14, items 6 and 10): a WebP, TIFF, BMP, PNG, a JPEG paused right
after its EXIF thumbnail, and a DICOM, each written in two halves with a pause longer than the settle window, are
screened once complete and never parked in failed/; camera subfolders, names with a trailing space and ``.jpe``
are taken, every file not taken is reported with why; a batch with a store streams its results as they are made.
Photographs: the CC0 fundus images in tests/data/fundus (see their PROVENANCE.md)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fundus_edge.cli import main
from fundus_edge.runtime.field.complete import completeness
from fundus_edge.runtime.field.session import Patient, open_session
from fundus_edge.runtime.field.store import ResultStore
from fundus_edge.runtime.field.watch import Watcher, WatchOptions

OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


def _photo(src: Path, side: int = 360) -> Image.Image:
    img = Image.open(src).convert("RGB")
    img.thumbnail((side, side))
    return img


def _encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg_with_thumbnail(img: Image.Image) -> tuple[bytes, int]:
    """A JPEG whose EXIF APP1 segment holds a thumbnail JPEG (with its own FF D9), and the offset right after the
    thumbnail's end marker: where a camera app that writes the EXIF block first may pause."""
    main_jpeg, thumb = _encode(img, "JPEG", quality=90), _encode(img.resize((160, 107)), "JPEG", quality=80)
    app1 = b"Exif\x00\x00" + b"II*\x00\x08\x00\x00\x00" + b"\x00" * 6 + thumb
    data = main_jpeg[:2] + b"\xff\xe1" + (len(app1) + 2).to_bytes(2, "big") + app1 + main_jpeg[2:]
    return data, data.index(thumb) + len(thumb)


def dicom_photo(img: Image.Image, laterality: str = "L", name: str = "Doe^Jane") -> bytes:
    """An uncompressed Ophthalmic Photography DICOM of ``img`` with demographics set (that must never be shown)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = OP_8BIT, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = OP_8BIT, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.77", "1.2.826.0.1.3680043.8.498.78"
    ds.Modality, ds.PatientName, ds.PatientID, ds.PatientBirthDate = "OP", name, "MRN-DICOM-1", "19600101"
    ds.ImageLaterality = laterality
    arr = np.asarray(img)
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_completeness_by_structure_for_every_format(real_photos: list[Path], tmp_path: Path) -> None:
    img = _photo(real_photos[1])
    thumb_jpeg, after_thumb = jpeg_with_thumbnail(img)
    cases = {"jpg": _encode(img, "JPEG"), "thumb.jpg": thumb_jpeg, "png": _encode(img, "PNG"),
             "webp": _encode(img, "WEBP", quality=80), "lossless.webp": _encode(img, "WEBP", lossless=True),
             "tif": _encode(img, "TIFF"), "lzw.tif": _encode(img, "TIFF", compression="tiff_lzw"),
             "bmp": _encode(img, "BMP")}
    p = tmp_path / "f"
    for name, data in cases.items():
        p.write_bytes(data)
        assert completeness(p) is True, name
        for cut in range(1, 20):  # every 5 % of the file: never judged whole
            p.write_bytes(data[:len(data) * cut // 20])
            assert completeness(p) is False, (name, cut)
    p.write_bytes(thumb_jpeg[:after_thumb])  # ends with the thumbnail's FF D9: the old check took it as whole
    assert thumb_jpeg[:after_thumb].endswith(b"\xff\xd9") and completeness(p) is False
    p.write_bytes(dicom_photo(img))
    assert completeness(p) is None  # no structural end to check: the decode check and the grace period decide


def test_every_format_written_in_two_halves_is_screened_once_complete(built: Any, tmp_path: Path,
                                                                      real_photos: list[Path]) -> None:
    inbox, done, db = tmp_path / "inbox", tmp_path / "done", tmp_path / "r.db"
    inbox.mkdir()
    img = _photo(real_photos[2])
    thumb_jpeg, after_thumb = jpeg_with_thumbnail(img)
    files = {"a.webp": (_encode(img, "WEBP", quality=85), None), "b.tif": (_encode(img, "TIFF"), None),
             "c.bmp": (_encode(img, "BMP"), None), "d.png": (_encode(img, "PNG"), None),
             "e.jpg": (thumb_jpeg, after_thumb), "f.dcm": (dicom_photo(img), None)}
    during: dict[str, tuple[int, bool]] = {}

    def camera(stop: threading.Event) -> None:  # writes each file in two halves with a pause (> settle) between
        try:
            for name, (data, cut) in files.items():
                cut = cut or len(data) // 2
                with open(inbox / name, "wb") as fh:
                    fh.write(data[:cut])
                    fh.flush()
                    time.sleep(1.2)
                    with ResultStore(db, create=False) as s:
                        during[name] = (sum(Path(r.source).name == name for r in s.rows()),
                                        (done / "failed" / name).exists())
                    fh.write(data[cut:])
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and len(list(done.glob("*.*"))) < len(files):
                time.sleep(0.1)
        finally:
            stop.set()

    store = ResultStore(db)
    with open_session(built.out, store=store) as session:
        w = Watcher(session, WatchOptions(directory=inbox, after="move", move_to=done, poll_s=0.05, settle_s=0.3,
                                          incomplete_grace_s=30.0), Patient(), keep_results=True)
        t = threading.Thread(target=camera, args=(w.stop,))
        t.start()
        summary = w.run()
        t.join(90)
    rows = {Path(r.source).name: r for r in store.rows()}
    store.close()
    assert during == {name: (0, False) for name in files}  # nothing recorded or parked while half written
    assert set(rows) == set(files) and all(r.ok for r in rows.values()), {n: r.error for n, r in rows.items()}
    assert summary.errors == 0 and summary.screened == len(files)
    assert not (done / "failed").exists() and sorted(p.name for p in done.iterdir()) == sorted(files)
    assert summary.deferred >= 1  # the DICOM (no structural end) was read half written, failed, and was retried
    assert rows["f.dcm"].laterality == "L" and rows["f.dcm"].eye == "left"  # eye from the DICOM laterality


def test_camera_subfolders_odd_names_and_every_skip_reported(built: Any, tmp_path: Path, real_photos: list[Path],
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    inbox, db = tmp_path / "card", tmp_path / "r.db"
    jpeg = _encode(_photo(real_photos[0]), "JPEG", quality=90)
    other = _encode(_photo(real_photos[3]), "JPEG", quality=90)
    taken = {"DCIM/100CAM/IMG_0001.JPG ": jpeg, "DCIM/100CAM/IMG_0002.jpe": other,
             "DCIM/101CAM/IMG_0001.JPG": _encode(_photo(real_photos[4]), "JPEG"),
             "a/b/c/three-down.jpg": _encode(_photo(real_photos[1]), "JPEG")}
    not_taken = {"DCIM/100CAM/notes.txt": b"x", "DCIM/.thumbs/t.jpg": jpeg, "DCIM/100CAM/.IMG_0003.jpg": jpeg,
                 "a/b/c/d/four-down.jpg": jpeg}
    for rel, data in {**taken, **not_taken}.items():
        (inbox / rel).parent.mkdir(parents=True, exist_ok=True)
        (inbox / rel).write_bytes(data)
    os.symlink(inbox / "DCIM/100CAM/IMG_0002.jpe", inbox / "link.jpg")
    code = main(["screen", "--bundle", str(built.out), "--watch", str(inbox), "--store", str(db), "--settle", "0",
                 "--poll", "0.05", "--exit-when-idle", "--jsonl"])
    out = capsys.readouterr()
    assert code == 0
    lines = [json.loads(x) for x in out.out.splitlines()]
    results, summary = [d["result"] for d in lines if "result" in d], lines[-1]["summary"]
    assert sorted(r["source"][len(str(inbox)) + 1:] for r in results) == sorted(taken)
    assert all(r["ok"] for r in results)
    assert summary["skipped"] == 5 and summary["skip_reasons"] == {
        "not an image suffix": 1, "hidden folder": 1, "hidden name (a file still being written)": 1,
        "folder more than 3 levels down": 1, "not a regular file (a link, a FIFO, a device)": 1}
    for shown in ("notes.txt: not an image suffix", ".thumbs: hidden folder", "link.jpg: not a regular file",
                  ".IMG_0003.jpg: hidden name", "/a/b/c/d: folder more than 3 levels down"):
        assert shown in out.err, shown


def test_a_batch_with_a_store_streams_results_as_they_are_made(built: Any, tmp_path: Path,
                                                               real_photos: list[Path]) -> None:
    base = _photo(real_photos[0], 320)
    photos = []
    for i in range(60):  # distinct images (an 8x8 block of their own colour): each one is screened
        img = base.copy()
        img.paste((40 + i * 3, 200 - i * 2, 90), (8 * (i % 16), 8 * (i // 16), 8 * (i % 16) + 8, 8 * (i // 16) + 8))
        photos.append(tmp_path / f"p{i:02d}.jpg")
        img.save(photos[-1], "JPEG", quality=90)
    env = {**os.environ, "FUNDUS_EDGE_PATIENT_ID": "MRN-ENV-5"}
    for mode in ("--jsonl", None):
        db = tmp_path / f"r{mode}.db"
        cmd = [sys.executable, "-m", "fundus_edge", "screen", "--bundle", str(built.out), "--store", str(db),
               "--pipeline", "off", *map(str, photos), *([mode] if mode else [])]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        first = proc.stdout.readline() if mode else (proc.stdout.readline(), proc.stdout.readline())[1]
        still_running = proc.poll() is None
        proc.kill()
        proc.communicate(timeout=30)  # reaps it and closes the pipes
        assert still_running  # a result was shown while the batch was still going
        if mode:
            doc = json.loads(first)["result"]
            assert doc["source"] == str(photos[0]) and doc["decision"] in ("refer", "no-refer")
            assert "patient_id" not in doc  # patient fields stay out of output unless asked
        else:
            assert first.startswith("p00.jpg") and ("REFER" in first or "NO-REFER" in first)
        with ResultStore(db) as s:  # the patient ID came from the environment, not from argv
            assert {r.patient_id for r in s.rows()} == {"MRN-ENV-5"}


def test_a_second_watcher_on_the_same_folder_is_refused(built: Any, tmp_path: Path, real_photos: list[Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Two watchers on one folder raced for the same files (spurious not-found rows): the second is refused,
    and once the first stops the folder can be watched again."""
    from fundus_edge.runtime.field.watch import sole_watcher

    inbox, db = tmp_path / "card", tmp_path / "r.db"
    inbox.mkdir()
    (inbox / "IMG_0001.jpg").write_bytes(_encode(_photo(real_photos[0]), "JPEG", quality=90))
    argv = ["screen", "--bundle", str(built.out), "--watch", str(inbox), "--store", str(db), "--settle", "0",
            "--poll", "0.05", "--exit-when-idle", "--jsonl"]
    with sole_watcher(inbox):  # a watcher already running on the folder
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and "already watching" in err and "Traceback" not in err
        assert [p.name for p in inbox.iterdir()] == ["IMG_0001.jpg"]  # the refused watcher took nothing
    assert main(argv) == 0  # the lock went with the first watcher
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [d["result"]["source"] for d in lines if "result" in d] == [str(inbox / "IMG_0001.jpg")]
