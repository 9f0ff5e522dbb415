"""Run the screening worker in a child process capped like the device: cores, memory, threads.

* cores: CPU affinity to ``min(device cores, host cores)`` host CPUs;
* memory: a cgroup v1 memory controller limit (``memory.limit_in_bytes``) set to the device's budget where this
  machine lets us create one (root, v1 hierarchy mounted), else ``RLIMIT_AS`` at the device's total RAM. An
  address-space limit is stricter than the device (virtual reservations of thread stacks and malloc arenas
  count), so a run that trips it is reported as such, not as a measured overflow;
* threads: the profile's, passed to the backend.

Peak RSS is the kernel's VmHWM of the child (its own report at the end; the parent's samples every 20 ms when
it dies first). ``ru_maxrss`` of a child is not used: it starts from the parent's size at fork.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EmulationError

CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
MB = 1 << 20


@dataclass(frozen=True)
class CapPlan:
    cores: tuple[int, ...]
    threads: int
    budget_mb: int  # what the device leaves the screener
    ram_mb: int  # the device variant's total RAM
    memory_cap: str  # "cgroup" | "rlimit" | "none"
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"cores": list(self.cores), "threads": self.threads, "budget_mb": self.budget_mb,
                "ram_mb": self.ram_mb, "memory_cap": self.memory_cap, "notes": list(self.notes)}


def _own_cgroup_v1_memory() -> Path | None:
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                return CGROUP_V1_MEMORY / path.lstrip("/")
    except (OSError, ValueError):
        return None
    return None


def cgroup_v1_available() -> Path | None:
    """A cgroup v1 memory directory under which this process may create a child group, or None."""
    for parent in (_own_cgroup_v1_memory(), CGROUP_V1_MEMORY):
        if parent and (parent / "memory.limit_in_bytes").is_file() and os.access(parent, os.W_OK):
            return parent
    return None


def plan_caps(cores: int, threads: int, ram_mb: int, budget_mb: int, memory_cap: str = "auto") -> CapPlan:
    host = sorted(os.sched_getaffinity(0))
    notes = []
    use = tuple(host[:cores])
    if len(host) < cores:
        notes.append(f"this host offers {len(host)} cores, the device has {cores}: the capped run uses {len(host)}")
    if memory_cap == "auto":
        memory_cap = "cgroup" if cgroup_v1_available() else "rlimit"
        if memory_cap == "rlimit":
            notes.append("no writable cgroup v1 memory controller: capped with RLIMIT_AS (address space) at the "
                         "device's total RAM, which is stricter than the device")
    elif memory_cap == "cgroup" and not cgroup_v1_available():
        raise EmulationError("--memory-cap cgroup: no writable cgroup v1 memory controller here (needs root and "
                             f"{CGROUP_V1_MEMORY}); use --memory-cap rlimit or auto")
    return CapPlan(use, threads, budget_mb, ram_mb, memory_cap, tuple(notes))


@contextlib.contextmanager
def cgroup_v1_memory(limit_bytes: int) -> Iterator[Path]:
    parent = cgroup_v1_available()
    if parent is None:
        raise EmulationError("no writable cgroup v1 memory controller")
    cg = parent / f"fundus-edge-emulate-{os.getpid()}-{time.monotonic_ns()}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(limit_bytes))
        swap = cg / "memory.memsw.limit_in_bytes"
        if swap.is_file():
            with contextlib.suppress(OSError):
                swap.write_text(str(limit_bytes))  # no swapping out of the cap either
        yield cg
    finally:
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except OSError:
                time.sleep(0.05)


@dataclass
class WorkerRun:
    """One worker child: its result (None when it failed), how it ended, and what it used."""

    returncode: int
    wall_s: float
    peak_rss_mb: float
    result: dict[str, Any] | None
    outputs: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    killed_by: str = ""  # "memory-cap" | "timeout" | "signal N" | ""
    cgroup_max_usage_mb: float | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.result is not None


def vm_hwm_kb(pid: int | str = "self") -> int | None:
    """Peak resident set size (VmHWM) of a process since its exec, in kB."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, int, bool]:
    """Wait for the child, sampling its VmHWM (the child's ru_maxrss is no use: it starts from the parent's
    size at fork). Returns (exit code, highest VmHWM seen in kB, timed out)."""
    deadline = time.monotonic() + timeout
    hwm = 0
    while True:
        hwm = max(hwm, vm_hwm_kb(proc.pid) or 0)
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, hwm, False
        if time.monotonic() > deadline:
            proc.kill()
            _, status = os.waitpid(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, hwm, True
        time.sleep(0.02)


def run_worker(cmd_prefix: list[str], request: dict[str, Any], env: dict[str, str] | None = None,
               plan: CapPlan | None = None, timeout: float = 1800) -> WorkerRun:
    """Run ``cmd_prefix + [-m, fundus_edge.devices.worker, REQUEST]`` and collect what it wrote."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="fundus-edge-worker-") as tmp:
        out_dir = Path(tmp)
        req = {**request, "out_dir": str(out_dir), "caps": {}}
        cg_ctx: contextlib.AbstractContextManager[Path | None] = contextlib.nullcontext()
        if plan is not None:
            req["threads"] = plan.threads
            req["caps"]["cores"] = list(plan.cores)
            if plan.memory_cap == "rlimit":
                req["caps"]["rlimit_as_bytes"] = plan.ram_mb * MB
            elif plan.memory_cap == "cgroup":
                cg_ctx = cgroup_v1_memory(plan.budget_mb * MB)
        req_path = out_dir / "request.json"
        req_path.write_text(json.dumps(req))
        with cg_ctx as cg:
            if cg is not None:
                req["caps"]["cgroup_procs"] = str(cg / "cgroup.procs")
                req_path.write_text(json.dumps(req))
            child_env = dict(env if env is not None else os.environ)
            child_env.setdefault("MALLOC_ARENA_MAX", "2")
            t0 = time.perf_counter()
            with open(out_dir / "stderr.txt", "wb") as err:
                proc = subprocess.Popen([*cmd_prefix, "-m", "fundus_edge.devices.worker", str(req_path)],
                                        stdout=err, stderr=err, env=child_env)
                code, sampled_hwm_kb, timed_out = _wait(proc, timeout)
            wall = time.perf_counter() - t0
            cg_peak, failcnt = None, "0"
            if cg is not None:
                with contextlib.suppress(OSError, ValueError):
                    cg_peak = int((cg / "memory.max_usage_in_bytes").read_text()) / MB
                failcnt = (cg / "memory.failcnt").read_text().strip() if (cg / "memory.failcnt").is_file() else "0"
        stderr = (out_dir / "stderr.txt").read_text(errors="replace")
        result = json.loads((out_dir / "result.json").read_text()) if (out_dir / "result.json").is_file() else None
        outputs: dict[str, Any] = {}
        if result is not None and (out_dir / "outputs.npz").is_file():
            with np.load(out_dir / "outputs.npz") as npz:
                outputs = {k: npz[k] for k in npz.files}
        error = ""
        if (out_dir / "error.json").is_file():
            e = json.loads((out_dir / "error.json").read_text())
            error = f"{e['code']}: {e['message']}"
        killed = ""
        if timed_out:
            killed = "timeout"
        elif code < 0:
            sig = -code
            cap = plan.memory_cap if plan is not None else "none"
            oom = ((cap == "cgroup" and sig == signal.SIGKILL and failcnt != "0")
                   or (cap == "rlimit" and (sig == signal.SIGABRT or "bad_alloc" in stderr)))
            killed = "memory-cap" if oom else f"signal {signal.Signals(sig).name}"
        elif code == 75 or "MemoryError" in error or "bad_alloc" in stderr:
            killed = "memory-cap" if plan is not None and plan.memory_cap != "none" else ""
        if code != 0 and not error:
            error = "\n".join(stderr.strip().splitlines()[-12:])
    # The child's own VmHWM at its end is exact; the parent's samples stand in when it did not get that far.
    peak_kb = max(int((result or {}).get("vm_hwm_kb") or 0), sampled_hwm_kb)
    return WorkerRun(code, wall, peak_kb / 1024, result, outputs, error, killed, cg_peak)


def native_prefix() -> list[str]:
    return [sys.executable]
