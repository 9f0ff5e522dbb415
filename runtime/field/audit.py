"""An append-only audit log of what happened on the device: bundle loads and refusals, per-image errors,
session starts and stops, exports of results.

One JSON object per line (``jsonl``), appended with ``O_APPEND`` under an exclusive ``flock`` and ``fsync``-ed
before :meth:`AuditLog.record` returns, so an entry that was reported is on disk. Every entry carries
``prev``, the sha256 of the previous line, so an edit or deletion inside the file breaks the chain and
:func:`verify_audit_log` names the line. (A hash chain without a secret is *tamper-evident against partial
edits*, not against someone who rewrites the whole file or cuts its end: sync the log off the device for that.)

What never goes in: image bytes, patient fields, key material. :meth:`AuditLog.record` refuses fields named
like patient fields and values that look like a private key, so a careless caller fails loudly in tests
instead of leaking in the field. Image errors are logged by code and image sha256, never by path (file names
written by camera apps sometimes carry patient names).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from ...errors import StoreError

try:  # POSIX (Raspberry Pi OS, Jetson Linux); elsewhere single-process appends are still safe
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

GENESIS = "0" * 64
FORBIDDEN_FIELDS = frozenset({"patient_id", "patient", "eye", "image_bytes", "private_key", "passphrase"})
_TAIL_BYTES = 1 << 16


def utc_now() -> str:
    """UTC time, ISO 8601 with microseconds and a ``Z``: sorts as text (the store and the log use it)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def line_hash(line: bytes) -> str:
    """sha256 of one log line without its newline: the ``prev`` of the next entry."""
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def _check_fields(fields: dict[str, Any]) -> None:
    for key, value in fields.items():
        if key in FORBIDDEN_FIELDS:
            raise ValueError(f"audit entries never hold {key!r} (patient fields, image bytes and keys stay out)")
        if isinstance(value, (bytes, bytearray)):
            raise ValueError(f"audit field {key!r} is bytes; the audit log never holds raw data")
        if isinstance(value, str) and "PRIVATE KEY" in value:
            raise ValueError(f"audit field {key!r} looks like key material")
        if isinstance(value, dict):
            _check_fields(value)


class AuditLog:
    """Append entries to a jsonl audit log. Safe for several processes appending to the same file."""

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True, integrity: Any = None) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.integrity = integrity  # an integrity.Integrity: anchor the last entry outside the log
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open the audit log {self.path}: {exc.strerror or exc}; fix its directory's "
                             "permissions or choose another with --audit-log") from exc

    def _tail(self) -> tuple[str, int, bool]:
        """(hash of the last line, last seq, whether the file ends with a newline)."""
        size = os.fstat(self._fd).st_size
        if size == 0:
            return GENESIS, 0, True
        with open(self.path, "rb") as fh:
            fh.seek(max(0, size - _TAIL_BYTES))
            tail = fh.read()
            if tail.count(b"\n") < 2 and size > len(tail):  # one line longer than the window: read it all
                fh.seek(0)
                tail = fh.read()
        clean_end = tail.endswith(b"\n")
        # Without a newline at the end, a writer died mid-line: that fragment counts as the last line. The
        # next record() closes it with a newline and chains to it; verify_audit_log reports it as damaged.
        lines = tail.rstrip(b"\n").split(b"\n") if clean_end else tail.split(b"\n")
        seq = 0
        for raw in reversed(lines):
            try:
                seq = int(json.loads(raw)["seq"])
                break
            except (ValueError, KeyError, TypeError):
                continue
        return line_hash(lines[-1]), seq, clean_end

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one entry and return it. Raises ``ValueError`` for forbidden fields (a programming error)."""
        _check_fields(fields)
        try:
            return self._append(event, fields)
        except OSError as exc:
            raise StoreError(f"cannot write the audit log {self.path}: {exc.strerror or exc}; free disk space "
                             "or fix permissions, then restart") from exc

    def _append(self, event: str, fields: dict[str, Any]) -> dict[str, Any]:
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            prev, seq, clean_end = self._tail()
            entry: dict[str, Any] = {"seq": seq + 1, "time": utc_now(), "event": event, "pid": os.getpid(),
                                     **fields, "prev": prev}
            data = json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"
            os.write(self._fd, data if clean_end else b"\n" + data)
            if self.fsync:
                os.fsync(self._fd)
            if self.integrity is not None:
                self.integrity.write_anchor(self.path, "audit", {"seq": entry["seq"], "hash": line_hash(data)})
        finally:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        return entry

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass
class AuditCheck:
    """Result of :func:`verify_audit_log`; truthy when the chain is intact."""

    path: str
    entries: int = 0
    problems: list[str] = field(default_factory=list)
    damaged_lines: list[int] = field(default_factory=list)  # unparsable lines (e.g. a torn write), 1-based

    def __bool__(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": bool(self), "entries": self.entries, "problems": self.problems,
                "damaged_lines": self.damaged_lines}


def verify_audit_log(path: str | os.PathLike[str]) -> AuditCheck:
    """Check every line's ``prev`` against the line before it. A line that is not JSON (a writer killed
    mid-line) is listed in ``damaged_lines``; it is not a chain break as long as the next entry chains to it."""
    check = AuditCheck(path=str(path))
    data = Path(path).read_bytes()
    if not data:
        return check
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    else:
        check.damaged_lines.append(len(lines))
    prev = GENESIS
    for i, raw in enumerate(lines, start=1):
        try:
            entry = json.loads(raw)
            if not isinstance(entry, dict):
                raise ValueError("not an object")
        except ValueError:
            if i not in check.damaged_lines:
                check.damaged_lines.append(i)
            prev = line_hash(raw)
            continue
        check.entries += 1
        if entry.get("prev") != prev:
            check.problems.append(f"line {i}: 'prev' does not match line {i - 1}: entries were edited, "
                                  "inserted or removed")
        prev = line_hash(raw)
    return check
