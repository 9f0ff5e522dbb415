"""Write a bundle's manifest.json: every listed file's checksum filled in, validated, written atomically."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ._files import MANIFEST, file_entry
from .manifest import SCHEMA, SCHEMA_VERSION, FileEntry, Manifest


def _from_plain(root: Path, data: Mapping[str, Any], listed: list[str]) -> dict[str, Any]:
    """A dict as ``pipeline/build.py`` writes it (no schema keys, ``files`` a list of paths; the v1 layout when it
    has no ``task``) made ready for :meth:`Manifest.from_dict`. For the transition to a typed build."""
    d = dict(data)
    d["schema"] = SCHEMA
    d.setdefault("schema_version", SCHEMA_VERSION if "task" in d else 1)
    d["files"] = {rel: file_entry(root / rel) for rel in listed}
    return d


def write_manifest(root: Path, manifest: Manifest | Mapping[str, Any], files: Iterable[str] | None = None) -> Path:
    """Checksum the bundle's files into ``files``, check the whole manifest, write ``manifest.json`` atomically.

    ``manifest``: a :class:`Manifest` (its ``files`` keys are the files to list, unless ``files`` is given), or,
    while ``pipeline/build.py`` moves to the typed manifest, a plain dict as build writes it (validated through
    :meth:`Manifest.from_dict`; a v1-shaped dict is migrated to v2). Raises :class:`BundleError` naming the
    field when the manifest is not valid: build must never write a bundle the runtime would refuse.
    """
    root = Path(root)
    if isinstance(manifest, Manifest):
        listed = sorted(files if files is not None else manifest.files)
        entries = {rel: FileEntry(**file_entry(root / rel)) for rel in listed}
        typed = Manifest.from_dict(manifest.with_files(entries).to_dict())  # every check, real checksums included
    else:
        listed = sorted(files if files is not None else manifest.get("files", []))
        typed = Manifest.from_dict(_from_plain(root, manifest, listed))
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w") as fh:
        fh.write(typed.to_json())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / MANIFEST)
    return root / MANIFEST
