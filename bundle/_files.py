"""File checksums of a bundle (standard library only)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    """The JSON ``files`` entry of one file: its sha256 and size."""
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}
