"""Watch mode: screen image files as a camera app drops them into a directory.

- **Only complete files.** A file is taken once its size and mtime have not changed for ``settle_s`` (by its
  mtime's age, or by watching it that long, whichever comes first: a device without a real-time clock may
  jump backwards at boot) *and* its format's own structure says it is whole (runtime/field/complete.py: JPEG
  segments and end marker, PNG ``IEND``, the WebP RIFF size, the BMP file size, every TIFF strip and tile
  inside the file). A file that never becomes whole is taken after ``incomplete_grace_s`` and recorded as a
  decode error. **The decode is the final check**: a file that fails to decode while it changed under the read,
  or (a format with no structural end to check, such as DICOM) while younger than ``incomplete_grace_s``, is
  not recorded and not moved to ``failed/``: it is tried again once it changes or the grace period ends.
- **Every file not taken is recorded, with why** (``WatchSummary.skip_reasons``, ``on_skip``, and the audit log
  by reason and suffix, never by name): no image suffix (``.jpe`` and names with trailing spaces count as
  images), hidden names (a camera app should write ``.name.jpg`` or ``name.jpg.part`` and rename it when done,
  atomic on one file system), not a regular file, folders more than :data:`MAX_DEPTH` levels down (camera
  subfolders such as ``DCIM/100CAM/`` are entered).
- **Restarts neither re-screen nor skip.** Results are committed to the store before the file is moved or
  marked; after a crash in between, the file is seen again, its sha256 is found in the store, the stored result
  is reused and the file is moved or marked then. Nothing is kept only in memory.
- **What happens to a processed file** (``after``): ``keep`` leaves it (the store makes a second look cheap:
  one hash, no inference); ``move`` moves it to ``move_to`` (failed images to ``move_to/failed``), ``mark``
  writes a ``NAME.screened`` file next to it holding the result's row id, decision or error code.
- **One file never blocks the queue.** Before a file is screened, ``STORE.inflight`` records it and the attempt
  number (atomically, synced); it is cleared once the result is stored. A file that stopped the screener (a crash,
  the kernel's OOM killer) is found there when the watcher is started again, and is tried once more; after
  :data:`QUARANTINE_AFTER` attempts it is quarantined: stored and audited as an ``internal-error`` and handled like
  any failed image (``--after move``: into ``failed/``), and the queue goes on. Images too large for the device
  are refused before decoding (runtime/decode_limits.py), so they are recorded errors, not crashes.
- **One watcher per folder.** A second watcher on the same directory is refused (a lock on the directory), so
  two processes never race for one file.
- **Stopping.** :meth:`Watcher.run` returns after the current image once ``stop`` is set (the CLI sets it on
  SIGINT/SIGTERM), so a stop never leaves a half-recorded image.

Polling, not inotify: it works the same on every file system (including the FAT/exFAT of SD cards and USB
sticks, which inotify does not serve well) and costs one directory listing per ``poll_s``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UsageError
from ..screen import has_image_suffix
from .complete import completeness
from .files import MARK_SUFFIX, move_file, write_mark, write_synced
from .session import FieldSession, Patient
from .store import StoredScreening

INFLIGHT_SUFFIX = ".inflight"
MAX_DEPTH = 3  # subfolders entered below the watched directory (DCIM/100CAM is 2)
QUARANTINE_AFTER = 2  # attempts that ended the screener: the first and one retry
AFTER_CHOICES = ("keep", "move", "mark")


def looks_complete(path: Path) -> bool:
    """False only when the file's own structure says it is not whole yet (runtime/field/complete.py)."""
    return completeness(path) is not False


@dataclass
class WatchOptions:
    directory: Path
    after: str = "keep"
    move_to: Path | None = None
    poll_s: float = 1.0
    settle_s: float = 2.0
    incomplete_grace_s: float = 60.0
    exit_when_idle: bool = False

    def __post_init__(self) -> None:
        if self.after not in AFTER_CHOICES:
            raise UsageError(f"--after must be one of {', '.join(AFTER_CHOICES)}, got {self.after!r}")
        if self.after == "move" and self.move_to is None:
            raise UsageError("--after move needs --move-to DIR")
        if not self.directory.is_dir():
            raise UsageError(f"watch directory {self.directory} does not exist")
        if self.move_to is not None and self.move_to.resolve() == self.directory.resolve():
            raise UsageError("--move-to must not be the watched directory itself")
        if self.poll_s <= 0 or self.settle_s < 0 or self.incomplete_grace_s < self.settle_s:
            raise UsageError("need --poll > 0, --settle >= 0, and a grace period >= --settle")


@dataclass
class _Seen:
    key: tuple[int, int, int]  # size, mtime_ns, inode
    since: float  # monotonic time this key was first seen
    verdict: bool | None = None  # what the file's structure says (runtime/field/complete.py); None: cannot tell
    deferred: bool = False  # failed to decode while young: not recorded, tried again once it changes or ages
    stable_for: float = 0.0


@dataclass
class WatchSummary:
    screened: int = 0
    stored: int = 0
    errors: int = 0
    skipped: int = 0  # files (and folders) in the watched folder that are not taken: see skip_reasons
    skip_reasons: dict[str, int] = field(default_factory=dict)  # why, how many
    deferred: int = 0  # decode failures of files still being written: not recorded, tried again
    stopped_by: str = "idle"
    results: list[StoredScreening] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"screened": self.screened, "stored": self.stored, "errors": self.errors, "skipped": self.skipped,
                "skip_reasons": dict(self.skip_reasons), "deferred": self.deferred, "stopped_by": self.stopped_by}


@contextlib.contextmanager
def sole_watcher(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on the watched directory itself (``flock`` on its descriptor: nothing is written
    into a camera's folder) for as long as a watcher runs. A second watcher on the same folder is refused: two
    would race for the same files (one moves a file the other is reading, leaving spurious not-found rows)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another fundus-edge watch is already watching {directory}: two watchers on one folder "
                             "would race for the same files; stop the other one or watch another folder") from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class Watcher:
    """Poll a directory and screen what appears. See the module docstring for the guarantees."""

    def __init__(self, session: FieldSession, options: WatchOptions, patient: Patient | None = None,
                 stop: threading.Event | None = None,
                 on_result: Callable[[StoredScreening], None] | None = None, keep_results: bool = False,
                 on_skip: Callable[[str, str], None] | None = None) -> None:
        self.session = session
        self.opt = options
        self.patient = patient or Patient()
        self.stop = stop or threading.Event()
        self.on_result = on_result
        self.keep_results = keep_results
        self.on_skip = on_skip  # (path, reason) of each file or folder not taken, once
        self._seen: dict[Path, _Seen] = {}
        self._handled: set[tuple[Path, tuple[int, int, int]]] = set()
        self.stop_reason = "stopped"
        self.summary = WatchSummary()
        self._unavailable = False
        self._skipped: set[str] = set()

    # ------------------------------------------------------------------------------------------ scanning
    def _entries(self) -> list[os.DirEntry[str]]:
        """Files of the watched directory and its subfolders (a camera's DCIM/100CAM), sorted by path; hidden
        folders and ``move_to`` are not entered. Raises OSError when the watched directory itself is gone."""
        skip = self.opt.move_to.resolve() if self.opt.move_to is not None else None
        found: list[os.DirEntry[str]] = []
        stack: list[tuple[Path, int]] = [(self.opt.directory, 0)]
        while stack:
            d, depth = stack.pop()
            try:
                entries = list(os.scandir(d))
            except OSError:
                if depth == 0:
                    raise
                continue
            for e in entries:
                if e.name.endswith(MARK_SUFFIX) or (e.name.startswith(".") and e.name.endswith(".tmp")):
                    continue  # this watcher's own marks and their temporary files
                is_dir = e.is_dir(follow_symlinks=False)
                if skip is not None and is_dir and Path(e.path).resolve() == skip:
                    continue  # --move-to inside the watched folder: processed files
                if e.name.startswith("."):
                    self._skip(e, "hidden folder" if is_dir else "hidden name (a file still being written)")
                elif is_dir and depth >= MAX_DEPTH:
                    self._skip(e, f"folder more than {MAX_DEPTH} levels down")
                elif is_dir:
                    stack.append((Path(e.path), depth + 1))
                else:
                    found.append(e)
        return sorted(found, key=lambda e: e.path)

    def _skip(self, e: os.DirEntry[str], reason: str) -> None:
        """Record once that a file (or folder) in the watched folder is not taken, and why: the summary counts
        it, ``on_skip`` gets its path, the audit log the reason and suffix (never the name: it may name a
        patient)."""
        if e.path in self._skipped:
            return
        self._skipped.add(e.path)
        self.summary.skipped += 1
        self.summary.skip_reasons[reason] = self.summary.skip_reasons.get(reason, 0) + 1
        if self.on_skip is not None:
            self.on_skip(e.path, reason)
        if self.session.audit is not None:
            self.session.audit.record("watch-skipped", session_id=self.session.session_id, reason=reason,
                                      suffix=Path(e.name).suffix.lower()[:16])

    def _candidates(self) -> list[tuple[Path, os.stat_result]]:
        out: list[tuple[Path, os.stat_result]] = []
        try:
            entries = self._entries()
        except OSError as exc:  # e.g. a USB stick pulled out: say so once, keep polling until it is back
            if not self._unavailable:
                self._unavailable = True
                if self.session.audit is not None:
                    self.session.audit.record("watch-directory-unavailable", session_id=self.session.session_id,
                                              error=exc.strerror or type(exc).__name__)
            return out
        self._unavailable = False
        for e in entries:
            if not has_image_suffix(e.name):
                self._skip(e, "not an image suffix")
                continue
            try:
                if not e.is_file(follow_symlinks=False):
                    self._skip(e, "not a regular file (a link, a FIFO, a device)")
                    continue
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue  # gone between the listing and now (renamed or moved): seen again under its new name
            p = Path(e.path)
            key = (st.st_size, st.st_mtime_ns, st.st_ino)
            if (p, key) in self._handled or self._marked(p, key):
                continue
            out.append((p, st))
        return out

    def _marked(self, p: Path, key: tuple[int, int, int]) -> bool:
        if self.opt.after != "mark":
            return False
        mark = p.with_name(p.name + MARK_SUFFIX)
        try:
            doc = json.loads(mark.read_text())
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and doc.get("size") == key[0] and doc.get("mtime_ns") == key[1]

    def _ready(self, p: Path, st: os.stat_result, now: float) -> bool:
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        seen = self._seen.get(p)
        if seen is None or seen.key != key:
            self._seen[p] = seen = _Seen(key, now)
        seen.stable_for = stable_for = max(now - seen.since, time.time() - st.st_mtime)
        if stable_for < self.opt.settle_s:
            return False
        if stable_for >= self.opt.incomplete_grace_s:
            return True
        if seen.deferred or st.st_size == 0:
            return False
        seen.verdict = completeness(p)
        return seen.verdict is not False

    def _defer(self, p: Path, key: tuple[int, int, int]) -> Callable[[StoredScreening], bool]:
        """Whether a decode failure of ``p`` may only mean it was incomplete: it changed while it was read, or
        its format gives no structural end to check and it is younger than the grace period."""
        def still_writing(rec: StoredScreening) -> bool:
            try:
                st = p.stat()
                changed = (st.st_size, st.st_mtime_ns, st.st_ino) != key
            except OSError:
                changed = True
            seen = self._seen.get(p)
            young = seen is not None and seen.verdict is None and seen.stable_for < self.opt.incomplete_grace_s
            return changed or young
        return still_writing

    # ------------------------------------------------------------------------------------------ running
    def poll_once(self) -> tuple[int, int]:
        """Process every ready file once; returns (processed, still waiting)."""
        now = time.monotonic()
        cands = self._candidates()
        alive = {p for p, _ in cands}
        for gone in set(self._seen) - alive:
            del self._seen[gone]
        processed = waiting = 0
        for p, st in cands:
            if self.stop.is_set():
                break
            if not self._ready(p, st, now):
                waiting += 1
                continue
            key = (st.st_size, st.st_mtime_ns, st.st_ino)
            rec = self._screen_guarded(p, key)
            if rec.extra.get("deferred"):  # failed only because it was incomplete: not recorded, tried again
                self._seen[p].deferred = True
                self.summary.deferred += 1
                waiting += 1
                continue
            self._finish(p, key, rec)
            processed += 1
            if self.on_result is not None:
                self.on_result(rec)
        return processed, waiting

    # ------------------------------------------------------------------------------------------ quarantine
    @property
    def journal(self) -> Path | None:
        store = self.session.store
        return Path(str(store.path) + INFLIGHT_SUFFIX) if store is not None else None

    def _attempts(self, p: Path, key: tuple[int, int, int]) -> int:
        """How many earlier runs started on this file (this size/mtime/inode) and never finished it."""
        try:
            doc = json.loads(self.journal.read_text()) if self.journal is not None else None
        except (OSError, ValueError):
            return 0
        if isinstance(doc, dict) and doc.get("path") == str(p) and doc.get("key") == list(key):
            n = doc.get("attempts")
            return n if isinstance(n, int) and n > 0 else 0
        return 0

    def _screen_guarded(self, p: Path, key: tuple[int, int, int]) -> StoredScreening:
        tried = self._attempts(p, key)
        journal = self.journal
        if tried >= QUARANTINE_AFTER:
            rec = self.session.record_failure(
                p, self.patient, "internal-error",
                f"quarantined: screening this file stopped the screener {tried} times (a crash, or the memory "
                "limit); it is not tried again")
            if self.session.audit is not None:
                self.session.audit.record("quarantined", session_id=self.session.session_id, attempts=tried,
                                          image_sha256=rec.image_sha256, row=rec.id or None)
        else:
            if journal is not None:
                write_synced(journal, json.dumps({"path": str(p), "key": list(key), "attempts": tried + 1}))
            rec = self.session.screen_file(p, self.patient, defer=self._defer(p, key))
        if journal is not None:
            journal.unlink(missing_ok=True)
        return rec

    def run(self) -> WatchSummary:
        """Poll until ``stop`` is set (or, with ``exit_when_idle``, until nothing is left to do). Refused with
        :class:`UsageError` while another watcher runs on the same directory."""
        with sole_watcher(self.opt.directory):
            return self._run()

    def _run(self) -> WatchSummary:
        summary = self.summary
        while not self.stop.is_set():
            processed, waiting = self.poll_once()
            if self.opt.exit_when_idle and processed == 0 and waiting == 0 and not self.stop.is_set():
                summary.stopped_by = "idle"
                return summary
            deadline = time.monotonic() + self.opt.poll_s
            while not self.stop.is_set() and time.monotonic() < deadline:
                self.stop.wait(min(0.2, self.opt.poll_s))
        summary.stopped_by = self.stop_reason
        return summary

    def _finish(self, p: Path, key: tuple[int, int, int], rec: StoredScreening) -> None:
        s = self.summary
        if rec.extra.get("stored"):
            s.stored += 1
        else:
            s.screened += 1
        if rec.error_code is not None:
            s.errors += 1
        if self.keep_results:
            s.results.append(rec)
        self._seen.pop(p, None)
        try:
            if self.opt.after == "move" and self.opt.move_to is not None:
                dest = self.opt.move_to if rec.error_code is None else self.opt.move_to / "failed"
                if p.exists():
                    move_file(p, dest, rec.image_sha256)
                return
            if self.opt.after == "mark":
                write_mark(p, key, rec)
        except OSError as exc:  # the result is stored; only the tidy-up failed: say so once, do not loop
            if self.session.audit is not None:
                self.session.audit.record("after-failed", session_id=self.session.session_id, action=self.opt.after,
                                          row=rec.id, error=exc.strerror or type(exc).__name__)
        self._handled.add((p, key))
