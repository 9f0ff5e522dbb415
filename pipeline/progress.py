"""Progress lines of a build: ``[i/n] stage`` headers and per-image counters, all through one ``log`` callback
(stderr by default). Library code never prints; the callback decides where the lines go."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

Log = Callable[[str], None]


def stderr_log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class Progress:
    """Numbers the stages of a run of ``total`` stages and times the current one."""

    def __init__(self, log: Log, total: int) -> None:
        self.log = log
        self.total = total
        self.done = 0
        self.started = time.perf_counter()

    def stage(self, text: str) -> None:
        """Start the next stage: ``[i/n] text``."""
        self.done += 1
        self.log(f"[{self.done}/{self.total}] {text}")
        self.started = time.perf_counter()

    def say(self, text: str) -> None:
        """A detail line of the current stage, indented under its header."""
        self.log(f"      {text}")

    def seconds(self) -> str:
        """Time since the current stage started, as the detail lines show it: ``1.2s``."""
        return f"{time.perf_counter() - self.started:.1f}s"

    def counter(self, what: str) -> Counter:
        return Counter(self.log, what)


class Counter:
    """``what: done/total`` every tenth of the way (a progress callback for long loops)."""

    def __init__(self, log: Log, what: str) -> None:
        self.log = log
        self.what = what
        self.tenths = 0

    def __call__(self, done: int, total: int) -> None:
        tenths = done * 10 // max(total, 1)
        if tenths > self.tenths or done == total:
            self.tenths = tenths
            self.log(f"      {self.what}: {done}/{total}")
