"""Device profiles: one small TOML file per device in ``devices/profiles/``, validated into frozen dataclasses.

A profile says what the device is (arch, cores, RAM, the QEMU CPU model that emulates it), how to run a bundle
there (preferred artifacts as ``format/precision`` in order, backends, execution-provider order, threads), the
latency budget, and how to install the runtime on it (OS, Python, glibc, the pip command). Nothing here imports
a backend: profiles are data.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DeviceError, UsageError

if TYPE_CHECKING:
    pass

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 devices (Jetson Orin, JetPack 6)
    import tomli as tomllib

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
ARCHES = ("aarch64", "x86_64")
FORMATS = ("onnx", "tflite")
PRECISIONS = ("fp32", "fp16", "int8")
# Which runtime backend runs which artifact format (names as in runtime/backends).
BACKEND_FOR_FORMAT = {"onnx": "onnxruntime", "tflite": "litert"}
FALLBACK_PROFILE = "generic-aarch64"


def _need(d: dict[str, Any], key: str, where: str) -> Any:
    if key not in d:
        raise DeviceError(f"{where}: missing field {key!r}")
    return d[key]


@dataclass(frozen=True)
class ArtifactPreference:
    """``format/precision``, e.g. ``tflite/int8``."""

    format: str
    precision: str

    @classmethod
    def parse(cls, text: str) -> ArtifactPreference:
        fmt, _, precision = text.partition("/")
        if fmt not in FORMATS or precision not in PRECISIONS:
            raise DeviceError(f"artifact preference {text!r} is not FORMAT/PRECISION with FORMAT in {FORMATS} and "
                              f"PRECISION in {PRECISIONS}")
        return cls(fmt, precision)

    def __str__(self) -> str:
        return f"{self.format}/{self.precision}"


@dataclass(frozen=True)
class CpuSpec:
    cores: int
    model: str
    qemu_cpu: str  # "" for a native (x86) profile
    midr: str  # MIDR_EL1 as hex, "" when not Arm
    features: str  # the /proc/cpuinfo "Features" line
    max_freq_khz: int

    @property
    def part(self) -> int | None:
        """The Arm CPU part number (MIDR bits 15:4), e.g. 0xd08 for Cortex-A72."""
        return (int(self.midr, 16) >> 4) & 0xFFF if self.midr else None


@dataclass(frozen=True)
class MemorySpec:
    ram_mb: tuple[int, ...]  # board variants
    reserved_mb: int  # what the OS and firmware take before the screener runs

    def budget_mb(self, ram_mb: int | None = None) -> int:
        """MB left for the screening process on the smallest variant (or on ``ram_mb``)."""
        return (ram_mb if ram_mb is not None else min(self.ram_mb)) - self.reserved_mb


@dataclass(frozen=True)
class ComputeSpec:
    """Peak arithmetic of the device's CPU and the share of it inference reaches (for projections only).

    ``*_macs_per_cycle``: multiply-accumulates per cycle per core at that precision; ``*_efficiency``: measured
    (or assumed) latency bound / latency of real networks, in (0, 1]; ``efficiency_source`` says which.
    """

    int8_macs_per_cycle: float
    fp32_macs_per_cycle: float
    int8_efficiency: float
    fp32_efficiency: float
    efficiency_source: str

    def macs_per_cycle(self, precision: str) -> float:
        """fp16 artifacts run fp32 arithmetic on these CPUs' execution providers."""
        return self.int8_macs_per_cycle if precision == "int8" else self.fp32_macs_per_cycle

    def efficiency(self, precision: str) -> float:
        return self.int8_efficiency if precision == "int8" else self.fp32_efficiency


@dataclass(frozen=True)
class RuntimeSpec:
    artifacts: tuple[ArtifactPreference, ...]
    backends: tuple[str, ...]
    providers: tuple[str, ...]
    threads: int
    latency_budget_ms: float


@dataclass(frozen=True)
class DetectSpec:
    device_tree_model: tuple[str, ...] = ()
    tegra_release: tuple[str, ...] = ()
    machine: tuple[str, ...] = ()
    fallback: bool = False


@dataclass(frozen=True)
class InstallSpec:
    os: str
    python: str  # "3.11": the device's system Python
    glibc: str  # "2.36"
    numpy: str
    extras: tuple[str, ...]
    pip: str
    notes: tuple[str, ...] = ()

    @property
    def python_tuple(self) -> tuple[int, int]:
        major, minor = self.python.split(".")[:2]
        return int(major), int(minor)

    @property
    def glibc_tuple(self) -> tuple[int, int]:
        major, minor = self.glibc.split(".")[:2]
        return int(major), int(minor)


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    arch: str
    supported: bool
    cpu: CpuSpec
    memory: MemorySpec
    runtime: RuntimeSpec
    detect: DetectSpec
    install: InstallSpec
    unsupported: str = ""
    source: str = ""
    compute: ComputeSpec | None = None  # optional [compute]: peak MACs and efficiency (bench projections)

    def __post_init__(self) -> None:
        where = f"device profile {self.name!r} ({self.source or 'in memory'})"
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]*", self.name):
            raise DeviceError(f"{where}: name must be lower-case letters, digits, '.' and '-'")
        if self.arch not in ARCHES:
            raise DeviceError(f"{where}: arch {self.arch!r} is not one of {ARCHES}")
        if self.cpu.cores < 1 or self.runtime.threads < 0:
            raise DeviceError(f"{where}: cores must be >= 1 and threads >= 0")
        if self.arch == "aarch64":
            self._check_arm(where)
        if not self.memory.ram_mb or min(self.memory.ram_mb) <= 0:
            raise DeviceError(f"{where}: memory.ram_mb must list the board's RAM variants in MB")
        if not 0 <= self.memory.reserved_mb < min(self.memory.ram_mb):
            raise DeviceError(f"{where}: memory.reserved_mb must be below the smallest RAM variant")
        if not self.runtime.artifacts:
            raise DeviceError(f"{where}: runtime.artifacts must list at least one FORMAT/PRECISION")
        unknown = [b for b in self.runtime.backends if b not in BACKEND_FOR_FORMAT.values()]
        if unknown or not self.runtime.backends:
            raise DeviceError(f"{where}: unknown backends {unknown}; known: {sorted(BACKEND_FOR_FORMAT.values())}")
        for pref in self.runtime.artifacts:
            if BACKEND_FOR_FORMAT[pref.format] not in self.runtime.backends:
                raise DeviceError(f"{where}: artifact {pref} needs backend {BACKEND_FOR_FORMAT[pref.format]!r}, "
                                  f"which runtime.backends {list(self.runtime.backends)} does not list")
        if not re.fullmatch(r"\d+\.\d+", self.install.python) or not re.fullmatch(r"\d+\.\d+", self.install.glibc):
            raise DeviceError(f"{where}: install.python and install.glibc must look like '3.11' and '2.36'")
        if not self.supported and not self.unsupported:
            raise DeviceError(f"{where}: an unsupported profile must say why in 'unsupported'")
        self._check_compute(where)

    def _check_arm(self, where: str) -> None:
        if not self.cpu.qemu_cpu:
            raise DeviceError(f"{where}: an aarch64 profile needs cpu.qemu_cpu (the QEMU model that emulates it)")
        if self.cpu.qemu_cpu == "max":
            raise DeviceError(f"{where}: qemu_cpu 'max' is refused: QEMU 7.2 computes wrong int8 results "
                              "with it; name the board's real core (e.g. cortex-a72)")
        if not re.fullmatch(r"0x[0-9a-fA-F]{8}", self.cpu.midr):
            raise DeviceError(f"{where}: cpu.midr must be a 32-bit hex MIDR_EL1 such as 0x410fd083")

    def _check_compute(self, where: str) -> None:
        c = self.compute
        if c is None:
            return
        if min(c.int8_macs_per_cycle, c.fp32_macs_per_cycle) <= 0 or self.cpu.max_freq_khz <= 0:
            raise DeviceError(f"{where}: [compute] needs MACs per cycle > 0 and cpu.max_freq_khz > 0")
        if not (0 < c.int8_efficiency <= 1 and 0 < c.fp32_efficiency <= 1):
            raise DeviceError(f"{where}: [compute] efficiencies must be in (0, 1]")

    @property
    def threads(self) -> int:
        return self.runtime.threads

    def backend_settings(self, threads: int | None = None) -> Any:
        """The runtime's :class:`BackendSettings` for this device (threads, provider order)."""
        from ..runtime.backends import BackendSettings

        return BackendSettings(threads=self.runtime.threads if threads is None else threads,
                               providers=self.runtime.providers)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["runtime"]["artifacts"] = [str(a) for a in self.runtime.artifacts]
        d["memory"]["budget_mb"] = self.memory.budget_mb()
        return d


def _tuple(v: Any, where: str, key: str) -> tuple[Any, ...]:
    if isinstance(v, str) or not isinstance(v, Iterable):
        raise DeviceError(f"{where}: {key} must be a list")
    return tuple(v)


def profile_from_dict(d: dict[str, Any], source: str = "") -> DeviceProfile:
    """Validate a parsed profile document (see ``devices/profiles/*.toml``)."""
    where = f"device profile {source or d.get('name', '?')}"
    cpu, mem, rt = _need(d, "cpu", where), _need(d, "memory", where), _need(d, "runtime", where)
    inst, det = _need(d, "install", where), d.get("detect", {})
    try:
        return DeviceProfile(
            name=str(_need(d, "name", where)),
            description=str(_need(d, "description", where)),
            arch=str(_need(d, "arch", where)),
            supported=bool(d.get("supported", True)),
            unsupported=str(d.get("unsupported", "")).strip(),
            cpu=CpuSpec(cores=int(_need(cpu, "cores", where)), model=str(_need(cpu, "model", where)),
                        qemu_cpu=str(cpu.get("qemu_cpu", "")), midr=str(cpu.get("midr", "")),
                        features=str(cpu.get("features", "")), max_freq_khz=int(cpu.get("max_freq_khz", 0))),
            memory=MemorySpec(ram_mb=tuple(int(x) for x in _tuple(_need(mem, "ram_mb", where), where, "ram_mb")),
                              reserved_mb=int(_need(mem, "reserved_mb", where))),
            runtime=RuntimeSpec(
                artifacts=tuple(ArtifactPreference.parse(str(a))
                                for a in _tuple(_need(rt, "artifacts", where), where, "artifacts")),
                backends=tuple(str(b) for b in _tuple(_need(rt, "backends", where), where, "backends")),
                providers=tuple(str(p) for p in _tuple(rt.get("providers", ["CPUExecutionProvider"]), where,
                                                       "providers")),
                threads=int(_need(rt, "threads", where)),
                latency_budget_ms=float(_need(rt, "latency_budget_ms", where))),
            detect=DetectSpec(device_tree_model=tuple(det.get("device_tree_model", ())),
                              tegra_release=tuple(det.get("tegra_release", ())),
                              machine=tuple(det.get("machine", ())), fallback=bool(det.get("fallback", False))),
            install=InstallSpec(os=str(_need(inst, "os", where)), python=str(_need(inst, "python", where)),
                                glibc=str(_need(inst, "glibc", where)), numpy=str(inst.get("numpy", "")),
                                extras=tuple(_tuple(inst.get("extras", ["onnx"]), where, "extras")),
                                pip=str(_need(inst, "pip", where)),
                                notes=tuple(_tuple(inst.get("notes", []), where, "notes"))),
            source=source,
            compute=_compute(d.get("compute"), where),
        )
    except (TypeError, ValueError) as exc:
        raise DeviceError(f"{where}: {exc}") from exc


def _compute(c: Any, where: str) -> ComputeSpec | None:
    if c is None:
        return None
    if not isinstance(c, dict):
        raise DeviceError(f"{where}: [compute] must be a table")
    return ComputeSpec(int8_macs_per_cycle=float(_need(c, "int8_macs_per_cycle", where)),
                       fp32_macs_per_cycle=float(_need(c, "fp32_macs_per_cycle", where)),
                       int8_efficiency=float(_need(c, "int8_efficiency", where)),
                       fp32_efficiency=float(_need(c, "fp32_efficiency", where)),
                       efficiency_source=str(c.get("efficiency_source", "")))


def read_toml(path: str | os.PathLike[str], error: type[Exception], what: str) -> dict[str, Any]:
    """A TOML file as a dict; unreadable or invalid files raise ``error`` naming ``what`` the file is."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise error(f"cannot read {what} {p}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{what} {p} is not valid TOML: {exc}") from exc


def load_profile_file(path: str | os.PathLike[str]) -> DeviceProfile:
    return profile_from_dict(read_toml(path, DeviceError, "device profile"), source=str(Path(path)))


def profile_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def list_profiles() -> list[DeviceProfile]:
    """Every shipped profile, by name."""
    return [load_profile_file(PROFILE_DIR / f"{n}.toml") for n in profile_names()]


def get_profile(name: str) -> DeviceProfile:
    """A shipped profile by name, or a profile file given by path (``my-board.toml``)."""
    if name.endswith(".toml") and Path(name).is_file():
        return load_profile_file(name)
    path = PROFILE_DIR / f"{name}.toml"
    if not path.is_file():
        import difflib

        names = profile_names()
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown device {name!r}.{hint} Known devices: {', '.join(names)} "
                         "(or give a profile file: --device path/to/board.toml)")
    return load_profile_file(path)


# ------------------------------------------------------------------------------------------ artifact choice
