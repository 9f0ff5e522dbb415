"""Fake ``/proc/cpuinfo`` and ``/sys/devices/system/cpu`` files for an emulated device, made from its profile.

Under QEMU user mode a guest reading ``/proc/cpuinfo`` gets the file of the emulation root when one exists
there. QEMU 7.2 otherwise passes the host's x86 file through, and onnxruntime's cpuinfo library segfaults on
it at import; QEMU >= 8 emulates ``/proc/cpuinfo`` itself but still shows the host's ``/sys`` CPU topology.
These files make the guest see the device's cores, MIDR and features either way, and its board name in
``/proc/device-tree/model``.
"""

from __future__ import annotations

from pathlib import Path

from .profile import DeviceProfile


def midr_fields(midr: str) -> dict[str, int]:
    v = int(midr, 16)
    return {"implementer": (v >> 24) & 0xFF, "variant": (v >> 20) & 0xF, "architecture": (v >> 16) & 0xF,
            "part": (v >> 4) & 0xFFF, "revision": v & 0xF}


def cpuinfo_text(profile: DeviceProfile) -> str:
    f = midr_fields(profile.cpu.midr)
    block = (f"BogoMIPS\t: 108.00\nFeatures\t: {profile.cpu.features}\nCPU implementer\t: 0x{f['implementer']:02x}\n"
             f"CPU architecture: 8\nCPU variant\t: 0x{f['variant']:x}\nCPU part\t: 0x{f['part']:03x}\n"
             f"CPU revision\t: {f['revision']}\n")
    text = "".join(f"processor\t: {i}\n{block}\n" for i in range(profile.cpu.cores))
    return text + f"Model\t\t: {profile.description} (emulated by fundus-edge)\n"


def cpu_files(profile: DeviceProfile) -> dict[str, str]:
    """Relative path (under the emulation root) -> content."""
    n = profile.cpu.cores
    span = f"0-{n - 1}" if n > 1 else "0"
    files = {"proc/cpuinfo": cpuinfo_text(profile)}
    if profile.detect.device_tree_model:  # so that `doctor` inside the emulated root names the board
        files["proc/device-tree/model"] = f"{profile.detect.device_tree_model[0]} (emulated)\x00"
    base = "sys/devices/system/cpu"
    for name in ("possible", "present", "online"):
        files[f"{base}/{name}"] = span + "\n"
    files[f"{base}/offline"] = "\n"
    files[f"{base}/kernel_max"] = f"{max(n - 1, 0)}\n"
    midr = f"0x{int(profile.cpu.midr, 16):016x}\n"
    freq = f"{profile.cpu.max_freq_khz}\n"
    for i in range(n):
        cpu = f"{base}/cpu{i}"
        files[f"{cpu}/cpufreq/cpuinfo_max_freq"] = freq
        files[f"{cpu}/cpufreq/cpuinfo_min_freq"] = f"{min(600000, profile.cpu.max_freq_khz)}\n"
        files[f"{cpu}/regs/identification/midr_el1"] = midr
        files[f"{cpu}/topology/physical_package_id"] = "0\n"
        files[f"{cpu}/topology/cluster_id"] = "0\n"
        files[f"{cpu}/topology/core_id"] = f"{i}\n"
        files[f"{cpu}/topology/thread_siblings_list"] = f"{i}\n"
        files[f"{cpu}/topology/core_siblings_list"] = span + "\n"
        files[f"{cpu}/topology/cluster_cpus_list"] = span + "\n"
        files[f"{cpu}/topology/package_cpus_list"] = span + "\n"
    return files


def write_cpu_files(root: Path, profile: DeviceProfile) -> list[Path]:
    written = []
    for rel, text in cpu_files(profile).items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.is_file() or p.read_text() != text:
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_text(text)
            tmp.replace(p)
        written.append(p)
    return written
