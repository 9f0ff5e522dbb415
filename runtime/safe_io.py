"""Reading files that an attacker may have placed: regular files only, never through a symlink, with a size cap.

``open()`` on a FIFO blocks until a writer appears, and ``/dev/zero`` never ends; a symlink can point outside
the directory that was checked. Every read of a bundle file or of an image to screen goes through here:
the file is opened without following a final symlink and without blocking, checked with ``fstat`` on the open
descriptor (so what is checked is what is read), and read up to a cap. Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

# The reasons a read is refused (``UnsafeFileError.reason``).
REASONS = ("missing", "symlink", "not-regular", "too-large", "unreadable")


class UnsafeFileError(Exception):
    """A file that is not read: ``reason`` is one of :data:`REASONS`; callers map it to their typed error."""

    def __init__(self, reason: str, path: str | os.PathLike[str], detail: str) -> None:
        super().__init__(f"{path}: {detail}")
        self.reason = reason
        self.path = str(path)
        self.detail = detail


def _open_regular(path: str | os.PathLike[str], max_bytes: int | None, follow_symlinks: bool = False
                  ) -> tuple[int, int]:
    """An open read-only descriptor of ``path`` and its size, or :class:`UnsafeFileError`."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise UnsafeFileError("missing", path, "does not exist") from exc
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafeFileError("symlink", path, "is a symbolic link; it is not followed") from exc
        raise UnsafeFileError("unreadable", path, f"cannot be read ({exc.strerror or exc})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file"
            raise UnsafeFileError("not-regular", path, f"is {kind}, not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise UnsafeFileError("too-large", path, f"has {st.st_size} bytes, over the limit of {max_bytes}")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_regular(path: str | os.PathLike[str], max_bytes: int | None = None, follow_symlinks: bool = False
                 ) -> bytes:
    """The bytes of a regular file (no FIFO, device or directory; no symlink unless ``follow_symlinks``, and
    then the target must be a regular file), at most ``max_bytes`` of them."""
    fd, size = _open_regular(path, max_bytes, follow_symlinks)
    try:
        with os.fdopen(fd, "rb", closefd=True) as fh:
            cap = size if max_bytes is None else min(size, max_bytes)
            data = fh.read(cap + 1)  # +1: a file that grew since fstat is caught, not silently cut
    except OSError as exc:
        raise UnsafeFileError("unreadable", path, f"cannot be read ({exc.strerror or exc})") from exc
    if max_bytes is not None and len(data) > max_bytes:
        raise UnsafeFileError("too-large", path, f"grew past the limit of {max_bytes} bytes while being read")
    return data


def sha256_regular(path: str | os.PathLike[str], max_bytes: int | None = None, chunk: int = 1 << 20,
                   follow_symlinks: bool = False) -> tuple[str, int]:
    """sha256 (hex) and byte count of a regular file, streamed (for files too large to hold in memory)."""
    fd, _ = _open_regular(path, max_bytes, follow_symlinks)
    h = hashlib.sha256()
    n = 0
    try:
        with os.fdopen(fd, "rb", closefd=True) as fh:
            while block := fh.read(chunk):
                n += len(block)
                if max_bytes is not None and n > max_bytes:
                    raise UnsafeFileError("too-large", path, f"grew past the limit of {max_bytes} bytes")
                h.update(block)
    except OSError as exc:
        raise UnsafeFileError("unreadable", path, f"cannot be read ({exc.strerror or exc})") from exc
    return h.hexdigest(), n


def inside(root: Path, rel: str) -> Path:
    """``root / rel`` when its resolved parent directory lies inside ``root`` (the final component is opened
    without following symlinks); raises :class:`UnsafeFileError` otherwise."""
    p = root / rel
    base = root.resolve()
    parent = p.parent.resolve()
    if parent != base and base not in parent.parents:
        raise UnsafeFileError("symlink", rel, "points outside the bundle")
    return p
