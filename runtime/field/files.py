"""Watch mode's file handling: durable moves and marks (runtime/field/watch.py)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .records import StoredScreening, fsync_dir

MARK_SUFFIX = ".screened"


def write_synced(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, durably (a crash right after leaves the old or the new content)."""
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def move_file(src: Path, dest_dir: Path, sha: str | None) -> Path:
    """Move ``src`` into ``dest_dir`` without overwriting anything; durable once it returns."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / src.name
    n = 0
    while target.exists():
        n += 1
        tag = (sha or "nohash")[:8] + (f"-{n}" if n > 1 else "")
        target = dest_dir / f"{src.stem}-{tag}{src.suffix}"
    try:
        os.replace(src, target)
    except OSError:  # another file system: copy, sync, rename into place, then remove the source
        tmp = dest_dir / f".{target.name}.moving"
        shutil.copy2(src, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(dest_dir)
        src.unlink()
    fsync_dir(dest_dir)
    fsync_dir(src.parent)
    return target


def write_mark(p: Path, key: tuple[int, int, int], rec: StoredScreening) -> Path:
    """``NAME.screened`` next to the image: row id, outcome, and the size/mtime it applies to."""
    mark = p.with_name(p.name + MARK_SUFFIX)
    doc = {"row": rec.id, "ok": rec.ok, "decision": rec.decision, "error_code": rec.error_code,
           "image_sha256": rec.image_sha256, "bundle_id": rec.bundle_id, "size": key[0], "mtime_ns": key[1]}
    tmp = mark.with_name("." + mark.name + ".tmp")
    tmp.write_text(json.dumps(doc, sort_keys=True) + "\n")
    os.replace(tmp, mark)
    return mark
