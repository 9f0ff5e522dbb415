"""``fundus-edge doctor``: which device this is, what the runtime can import here, and what to install.

Backends are imported in a child process each (a crashing native library must not take the report down);
where a child cannot be started (an emulated arm64 Python under QEMU user mode has no binfmt_misc to exec
another arm64 program) they are imported in-process.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .choice import runnable_formats
from .detect import Detection, detect
from .profile import BACKEND_FOR_FORMAT, DeviceProfile, get_profile

# (what, import name, distribution, code that prints extra detail)
CHECKS: tuple[tuple[str, str, str, str], ...] = (
    ("numpy", "numpy", "numpy", ""),
    ("pillow", "PIL", "pillow", ""),
    ("onnxruntime", "onnxruntime", "onnxruntime", "print(','.join(m.get_available_providers()))"),
    ("litert", "ai_edge_litert.interpreter", "ai-edge-litert", ""),
    ("tflite-runtime", "tflite_runtime.interpreter", "tflite-runtime", ""),
)
# Which checks can run an artifact format.
FORMAT_CHECKS = {"onnx": ("onnxruntime",), "tflite": ("litert", "tflite-runtime")}
_PROBE = """
import importlib, importlib.metadata as md, json, sys
name, dist, extra = sys.argv[1], sys.argv[2], sys.argv[3]
out = {{}}
try:
    m = importlib.import_module(name)
    out["ok"] = True
    try:
        out["version"] = md.version(dist)
    except md.PackageNotFoundError:
        out["version"] = getattr(m, "__version__", "?")
    if extra:
        import io, contextlib
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(extra, {{"m": m}})
        out["detail"] = buf.getvalue().strip()
except Exception as exc:
    out = {{"ok": False, "error": f"{{type(exc).__name__}}: {{exc}}"}}
print({marker!r} + json.dumps(out))
"""
_MARKER = "@@fundus-edge-doctor@@"


@dataclass
class Check:
    what: str
    ok: bool
    version: str = ""
    detail: str = ""
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"what": self.what, "ok": self.ok, "version": self.version, "detail": self.detail, "error": self.error}


def _probe_child(name: str, dist: str, extra: str) -> dict[str, Any] | None:
    code = _PROBE.format(marker=_MARKER)
    try:
        r = subprocess.run([sys.executable, "-c", code, name, dist, extra], capture_output=True, text=True,
                           timeout=120)
    except OSError:
        return None  # cannot exec a child here (e.g. under QEMU user mode): import in-process instead
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "import did not finish in 120 s"}
    for line in r.stdout.splitlines():
        if line.startswith(_MARKER):
            found: dict[str, Any] = json.loads(line[len(_MARKER):])
            return found
    if r.returncode < 0:
        return {"ok": False, "error": f"the import crashed the interpreter (signal {-r.returncode})"}
    return {"ok": False, "error": (r.stderr.strip().splitlines() or ["no output"])[-1]}


def _probe_here(name: str, dist: str, extra: str) -> dict[str, Any]:
    import contextlib
    import importlib
    import importlib.metadata as md
    import io

    try:
        m = importlib.import_module(name)
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    try:
        version = md.version(dist)
    except md.PackageNotFoundError:
        version = str(getattr(m, "__version__", "?"))
    out: dict[str, Any] = {"ok": True, "version": version}
    if extra:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(extra, {"m": m})
        out["detail"] = buf.getvalue().strip()
    return out


def check_imports(in_process: bool = False) -> list[Check]:
    checks = []
    for what, name, dist, extra in CHECKS:
        got = None if in_process else _probe_child(name, dist, extra)
        if got is None:
            got = _probe_here(name, dist, extra)
        checks.append(Check(what, bool(got.get("ok")), str(got.get("version", "")), str(got.get("detail", "")),
                            str(got.get("error", ""))))
    return checks


@dataclass
class DoctorReport:
    detection: Detection
    profile: DeviceProfile
    forced: bool
    system: dict[str, Any]
    checks: list[Check]
    advice: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    missing_packages: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def exit_code(self) -> int:
        """0 ok; 3 packages are missing (the advice says which); 12 the device cannot run the runtime."""
        if self.ok:
            return 0
        return 3 if self.missing_packages and self.profile.supported else 12

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile.name, "forced": self.forced, "detection": self.detection.to_dict(),
                "system": self.system, "checks": [c.to_dict() for c in self.checks], "advice": self.advice,
                "problems": self.problems, "ok": self.ok}

    def text(self) -> str:
        d, p = self.detection, self.profile
        lines = []
        if self.forced:
            lines.append(f"profile: {p.name} (chosen with --device; auto-detection would pick {d.profile.name}: "
                         f"{d.reason})")
        else:
            lines.append(f"profile: {p.name} — {p.description}")
            lines.append(f"  why: {d.reason} (matched by {d.matched_by})")
        lines += [f"  warning: {w}" for w in d.warnings]
        ev = ", ".join(f"{k}={v}" for k, v in d.evidence.items())
        lines.append(f"  read: {ev}")
        s = self.system
        lines.append(f"system: {s['os']}; Python {s['python']} ({s['machine']}); {s['libc']}; "
                     f"{s['cpus']} CPUs usable; {s.get('mem_total_mb', '?')} MB RAM")
        lines.append("runtime packages:")
        for c in self.checks:
            state = f"{c.version}" + (f" [{c.detail}]" if c.detail else "") if c.ok else f"NOT importable ({c.error})"
            lines.append(f"  {c.what:<15} {state}")
        lines.append(f"device settings: artifacts {', '.join(map(str, p.runtime.artifacts))}; backends "
                     f"{', '.join(p.runtime.backends)}; providers {' -> '.join(p.runtime.providers)}; "
                     f"threads {p.runtime.threads or 'auto'}; this runtime's backends run "
                     f"{', '.join(s.get('runtime_formats', []))} artifacts")
        lines += [f"problem: {x}" for x in self.problems]
        lines += [f"advice: {x}" for x in self.advice]
        lines.append("doctor: OK" if self.ok else "doctor: problems found")
        return "\n".join(lines)


def _system(evidence: dict[str, Any]) -> dict[str, Any]:
    os_name = "unknown OS"
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        os_name = platform.system()
    libc = platform.libc_ver()
    return {"os": os_name, "python": platform.python_version(), "machine": platform.machine(),
            "libc": f"{libc[0]} {libc[1]}".strip() or "unknown libc", "cpus": len(os.sched_getaffinity(0)),
            "mem_total_mb": evidence.get("mem_total_mb")}


def _broken_backends(by: dict[str, Check]) -> list[str]:
    """Backends that are installed (so the runtime would choose their artifacts) but do not import."""
    from ..runtime.backends import package_installed

    out = []
    for fmt, names in FORMAT_CHECKS.items():
        for what in names:
            module = next(name for w, name, _, _ in CHECKS if w == what)
            if not by[what].ok and package_installed(module.split(".")[0]):
                out.append(f"{what} is installed but does not import ({by[what].error}): screening would choose "
                           f"{fmt} artifacts and fail; reinstall it (pip install --force-reinstall) or uninstall it")
    return out


def run_doctor(device: str | None = None, root: Path = Path("/"), in_process: bool = False) -> DoctorReport:
    detection = detect(root)
    profile = get_profile(device) if device else detection.profile
    system = _system(detection.evidence)
    checks = check_imports(in_process)
    by = {c.what: c for c in checks}
    rep = DoctorReport(detection, profile, device is not None, system, checks)
    if not profile.supported:
        rep.problems.append(f"{profile.name} is not supported: {profile.unsupported}")
    for core in ("numpy", "pillow"):
        if not by[core].ok:
            rep.missing_packages = True
            rep.problems.append(f"{core} does not import ({by[core].error})")
    formats_here = runnable_formats()
    system["runtime_formats"] = sorted(formats_here)
    rep.problems += _broken_backends(by)
    usable = [pref for pref in profile.runtime.artifacts
              if pref.format in formats_here and any(by[c].ok for c in FORMAT_CHECKS[pref.format])]
    if not usable:
        rep.missing_packages = True
        rep.problems.append(f"no backend for any of {profile.name}'s artifact formats imports "
                            f"({', '.join(map(str, profile.runtime.artifacts))})")
        rep.advice.append(f"install: {profile.install.pip}")
    elif usable[0] != profile.runtime.artifacts[0]:
        first = profile.runtime.artifacts[0]
        rep.advice.append(f"{profile.name} prefers {first}, whose backend ({BACKEND_FOR_FORMAT[first.format]}) does "
                          f"not import here; it will run {usable[0]}. For the preferred one: {profile.install.pip}")
    if by["onnxruntime"].ok:
        have = set(by["onnxruntime"].detail.split(","))
        missing = [p for p in profile.runtime.providers if p not in have]
        if missing:
            rep.advice.append(f"onnxruntime here lacks {', '.join(missing)}: it falls back to "
                              f"{next((p for p in profile.runtime.providers if p in have), 'CPUExecutionProvider')}"
                              + (f". {profile.install.notes[0]}" if profile.install.notes else ""))
    mem = system.get("mem_total_mb")
    if mem and profile.arch == platform.machine() and mem < profile.memory.reserved_mb + 64:
        rep.problems.append(f"only {mem} MB RAM: {profile.name} expects at least {min(profile.memory.ram_mb)} MB")
    return rep
