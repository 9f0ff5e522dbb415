"""Which device is this? Board signatures first, then the CPU, then a generic fallback with a warning.

Reads ``/proc/device-tree/model`` (Raspberry Pi, Jetson), ``/etc/nv_tegra_release`` (Jetson L4T release),
``/proc/cpuinfo`` (Arm core part numbers) and the machine architecture. Every path is taken relative to
``root`` so that tests (and ``doctor --root``) can point it at a captured file tree.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .profile import FALLBACK_PROFILE, DeviceProfile, get_profile, list_profiles

ARM_PARTS = {0xD03: "Cortex-A53", 0xD04: "Cortex-A35", 0xD05: "Cortex-A55", 0xD07: "Cortex-A57",
             0xD08: "Cortex-A72", 0xD09: "Cortex-A73", 0xD0B: "Cortex-A76", 0xD0C: "Neoverse-N1",
             0xD0D: "Cortex-A77", 0xD41: "Cortex-A78", 0xD42: "Cortex-A78AE", 0xD4B: "Cortex-A78C",
             0xD40: "Neoverse-V1", 0xD49: "Neoverse-N2"}
_MACHINE_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64"}


@dataclass(frozen=True)
class Detection:
    """The picked profile, how it was matched, what was read, and warnings for the user."""

    profile: DeviceProfile
    matched_by: str  # "device-tree" | "tegra-release" | "machine" | "fallback"
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile.name, "matched_by": self.matched_by, "reason": self.reason,
                "evidence": self.evidence, "warnings": list(self.warnings)}


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().replace(b"\x00", b"").decode("utf-8", "replace").strip()
    except OSError:
        return None


def read_cpu_parts(cpuinfo: str) -> list[int]:
    """Arm ``CPU part`` numbers, one per processor entry, in order."""
    return [int(m, 16) for m in re.findall(r"^CPU part\s*:\s*(0x[0-9a-fA-F]+)", cpuinfo, flags=re.M)]


def read_evidence(root: Path = Path("/"), machine: str | None = None) -> dict[str, Any]:
    machine = (machine or platform.machine()).lower()
    ev: dict[str, Any] = {"machine": _MACHINE_ALIASES.get(machine, machine)}
    model = _read(root / "proc/device-tree/model") or _read(root / "sys/firmware/devicetree/base/model")
    if model:
        ev["device_tree_model"] = model
    tegra = _read(root / "etc/nv_tegra_release")
    if tegra:
        first = tegra.splitlines()[0]
        ev["nv_tegra_release"] = first
        m = re.search(r"\b(R\d+)\b", first)
        if m:
            ev["l4t_release"] = m.group(1)
    cpuinfo = _read(root / "proc/cpuinfo")
    if cpuinfo:
        parts = read_cpu_parts(cpuinfo)
        if parts:
            ev["cpu_parts"] = [f"0x{p:03x}" for p in parts]
            ev["cpu_cores"] = sorted({ARM_PARTS.get(p, f"part 0x{p:03x}") for p in parts})
        else:
            m = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, flags=re.M)
            if m:
                ev["cpu_model"] = m.group(1).strip()
        ev["processors"] = len(re.findall(r"^processor\s*:", cpuinfo, flags=re.M))
    meminfo = _read(root / "proc/meminfo")
    if meminfo:
        m = re.search(r"^MemTotal:\s*(\d+)\s*kB", meminfo, flags=re.M)
        if m:
            ev["mem_total_mb"] = int(m.group(1)) // 1024
    return ev


def _arch_warnings(profile: DeviceProfile, machine: str) -> list[str]:
    if machine == profile.arch:
        return []
    if machine in ("armv7l", "armv6l", "armhf"):
        return [f"this board runs a 32-bit userland ({machine}); fundus-edge needs the 64-bit OS on it "
                "(no armv7 wheels of onnxruntime or ai-edge-litert exist)"]
    return [f"the {profile.name} profile is for {profile.arch}, but this machine is {machine}"]


def detect(root: Path = Path("/"), machine: str | None = None) -> Detection:
    """Pick the profile for the machine at ``root`` (default: this one)."""
    ev = read_evidence(root, machine)
    arch = ev["machine"]
    profiles = list_profiles()
    model = ev.get("device_tree_model")
    if model:
        hits = [(len(pat), p) for p in profiles for pat in p.detect.device_tree_model if pat.lower() in model.lower()]
        if hits:
            prof = max(hits, key=lambda h: h[0])[1]
            return Detection(prof, "device-tree", f"/proc/device-tree/model is {model!r}", ev,
                             tuple(_arch_warnings(prof, arch)))
    release = ev.get("l4t_release")
    if release:
        for p in profiles:
            if release in p.detect.tegra_release:
                warn = [f"the board model ({model or 'unknown'}) is not one this profile names; settings for "
                        f"{p.description} are used", *_arch_warnings(p, arch)]
                return Detection(p, "tegra-release", f"/etc/nv_tegra_release says L4T {release}", ev, tuple(warn))
        fb = get_profile(FALLBACK_PROFILE)
        return Detection(fb, "fallback", f"L4T {release} has no profile", ev,
                         (f"no profile for Jetson L4T {release}; using the generic profile. Write one "
                          f"(copy devices/profiles/{FALLBACK_PROFILE}.toml)",))
    for p in profiles:
        if arch in p.detect.machine:
            return Detection(p, "machine", f"{arch} machine without a board signature (no device-tree model, no "
                             "/etc/nv_tegra_release): a developer workstation or CI runner", ev)
    fb = get_profile(FALLBACK_PROFILE)
    warnings = [f"no profile matches this machine ({model or 'no device-tree model'}, {arch}); using the "
                f"conservative {fb.name} profile. Pass --device NAME, or write a profile for this board"]
    parts = {int(x, 16) for x in ev.get("cpu_parts", [])}
    similar = [p.name for p in profiles if p.cpu.part is not None and p.cpu.part in parts and not p.detect.fallback]
    if similar:
        warnings.append(f"its CPU ({', '.join(ev['cpu_cores'])}) is the one in: {', '.join(similar)}")
    if arch != "aarch64":
        warnings.append(f"architecture {arch} is not one fundus-edge has device profiles for")
    return Detection(fb, "fallback", "no board signature matched", ev, tuple(warnings))
