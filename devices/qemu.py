"""QEMU user-mode emulation of one aarch64 process (no chroot, no binfmt_misc, no root).

``qemu-aarch64 -cpu cortex-a72 -L ROOT ROOT/usr/bin/python3.11 ...`` runs the arm64 Python of a Debian root
with its own loader and libraries: QEMU maps the guest's absolute paths into ROOT when the file exists there.
The CPU model comes from the device profile; ``-cpu max`` is never used (QEMU 7.2 computes wrong int8 results
with it).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..errors import EmulationError, MissingToolError

INSTALL_HINT = ("install them with 'make emulation-tools' (as root on Debian/Ubuntu: apt-get install "
                "qemu-user-static debootstrap; bookworm-backports has QEMU 10)")


@dataclass(frozen=True)
class Qemu:
    path: Path
    version: tuple[int, int, int]
    cpus: frozenset[str]

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def needs_fake_cpu_files(self) -> bool:
        """QEMU < 8 passes the host's x86 /proc/cpuinfo through, and onnxruntime crashes on it at import."""
        return self.version < (8, 0, 0)

    def command(self, cpu: str, root: Path, program: Path, args: list[str]) -> list[str]:
        if cpu == "max":
            raise EmulationError("refusing '-cpu max': QEMU 7.2 gives wrong int8 results with it; use the "
                                 "device's core (the profile's qemu_cpu)")
        if cpu not in self.cpus:
            raise EmulationError(f"{self.path} ({self.version_str}) has no CPU model {cpu!r}; it has "
                                 f"{', '.join(sorted(self.cpus))}. A newer QEMU may (bookworm-backports has 10.x)")
        return [str(self.path), "-cpu", cpu, "-L", str(root), str(program), *args]


def _probe(path: str) -> Qemu | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
        cpus = subprocess.run([path, "-cpu", "help"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", out)
    if not m:
        return None
    version = (int(m.group(1)), int(m.group(2)), int(m.group(3) or 0))
    names = frozenset(line.split()[0] for line in cpus.splitlines()[1:] if line.strip())
    return Qemu(Path(path), version, names)


@lru_cache(maxsize=4)
def find_qemu(arch: str = "aarch64") -> Qemu:
    """$FUNDUS_EDGE_QEMU if set, else the newest ``qemu-<arch>`` / ``qemu-<arch>-static`` on PATH."""
    if os.environ.get("FUNDUS_EDGE_QEMU"):
        candidates = [os.environ["FUNDUS_EDGE_QEMU"]]
    else:
        candidates = [f for f in (shutil.which(n) for n in (f"qemu-{arch}-static", f"qemu-{arch}")) if f]
    probed = [q for q in (_probe(c) for c in candidates) if q is not None]
    if not probed:
        raise MissingToolError(f"no qemu-{arch} user-mode emulator found on PATH; {INSTALL_HINT}")
    return max(probed, key=lambda q: q.version)


def find_tool(name: str) -> str:
    found = shutil.which(name) or next((str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name)
                                        if p.is_file()), None)
    if not found:
        raise MissingToolError(f"{name} is not installed; {INSTALL_HINT}")
    return found
