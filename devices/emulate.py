"""``fundus-edge emulate``: run a bundle as a device would, on x86.

1. A resource-capped native run per artifact (the device's cores, memory budget and threads) measures peak
   RSS against the device's RAM and fails when the bundle does not fit.
2. For an Arm device, the same worker runs as an arm64 process under QEMU user mode (the profile's CPU model)
   with the real aarch64 wheels, and its outputs are compared with the native ones per artifact.

Emulated speed is not device speed: emulator time is reported as such, never as device latency.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..bundle.read import Bundle, load_bundle
from ..errors import DeviceFitError, EmulationError, MissingDependencyError, ParityError, UsageError
from ..runtime.backends import EXTRA_FOR_FORMAT, install_hint
from .caps import CapPlan, WorkerRun, native_prefix, plan_caps, run_worker
from .choice import runnable_formats
from .parity import Parity, output_lsb, parity
from .parity_seg import SegParity, seg_parity
from .profile import BACKEND_FOR_FORMAT, DeviceProfile

Log = Callable[[str], None]


@dataclass
class EmulateConfig:
    profile: DeviceProfile
    bundle: Path
    images: list[str]
    artifacts: list[str] | None = None
    fmt: str | None = None
    precision: str | None = None
    ram_mb: int | None = None
    memory_cap: str = "auto"  # "auto" | "cgroup" | "rlimit" | "none"
    arch: str = "auto"  # "auto" | "native" | "aarch64"
    threads: int | None = None
    stack: str = "default"
    cache: Path | None = None
    timeout: float | None = None  # default: generous, from the number of images (a capped child can hang)


@dataclass(frozen=True)
class Fit:
    artifact: str
    peak_rss_mb: float
    budget_mb: int
    ram_mb: int
    reserved_mb: int
    fits: bool
    how: str  # why it fits or not

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "peak_rss_mb": round(self.peak_rss_mb, 1), "budget_mb": self.budget_mb,
                "ram_mb": self.ram_mb, "reserved_mb": self.reserved_mb, "fits": self.fits, "how": self.how}

    def row(self) -> str:
        return (f"{self.artifact:<12} peak RSS {self.peak_rss_mb:6.1f} MB of {self.budget_mb} MB "
                f"({self.ram_mb} MB RAM - {self.reserved_mb} MB reserved): {self.how}")


@dataclass
class EmulateReport:
    profile: DeviceProfile
    bundle: Bundle
    images: list[str]
    artifacts: list[str]
    plan: CapPlan
    native: dict[str, WorkerRun] = field(default_factory=dict)
    fits: list[Fit] = field(default_factory=list)
    emulated: WorkerRun | None = None
    emulation: dict[str, Any] = field(default_factory=dict)
    parities: list[Parity | SegParity] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fits_ok(self) -> bool:
        return all(f.fits for f in self.fits)

    @property
    def parity_ok(self) -> bool:
        return all(self.parities)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "device": self.profile.name, "bundle_id": self.bundle.bundle_id, "images": self.images,
            "artifacts": self.artifacts, "caps": self.plan.to_dict(), "fits": [f.to_dict() for f in self.fits],
            "fits_ok": self.fits_ok, "native": {}, "notes": self.notes,
        }
        for aid, run in self.native.items():
            d["native"][aid] = {"machine": platform.machine(), "returncode": run.returncode,
                                "killed_by": run.killed_by, "error": run.error,
                                "peak_rss_mb": round(run.peak_rss_mb, 1),
                                "cgroup_max_usage_mb": run.cgroup_max_usage_mb,
                                "results": (run.result or {}).get("artifacts", {}).get(aid, {}).get("results", [])}
        if self.emulated is not None:
            res = self.emulated.result or {}
            d["emulated"] = {**self.emulation, "machine": res.get("machine"), "python": res.get("python"),
                             "versions": res.get("versions"),
                             "emulator_seconds_not_device_latency": round(self.emulated.wall_s, 2),
                             "artifacts": {aid: {**{k: v for k, v in a.items() if k not in ("load_ms", "results")},
                                                 "results": [_emulator_times(r) for r in a.get("results", [])]}
                                           for aid, a in res.get("artifacts", {}).items()}}
            d["parity"] = [p.to_dict() for p in self.parities]
            d["parity_ok"] = self.parity_ok
        return d

    def text(self) -> str:
        p = self.profile
        lines = [f"device {p.name}: {p.description}",
                 f"bundle {self.bundle.bundle_id}: artifacts {', '.join(self.artifacts)}; {len(self.images)} images"]
        if not p.supported:
            lines.append(f"NOTE: {p.name} cannot run the fundus-edge runtime as shipped: {p.unsupported}")
        lines.append(f"x86_64 capped run: cores {list(self.plan.cores)}, threads {self.plan.threads}, memory cap "
                     f"{self.plan.memory_cap} ({self.plan.budget_mb} MB budget of {self.plan.ram_mb} MB RAM)")
        lines += [f"  note: {n}" for n in self.plan.notes]
        show = self.native
        source = "x86_64 capped run"
        if self.emulated is not None and self.emulated.result:
            res = self.emulated.result
            v = res.get("versions", {})
            lines.append(f"arm64 emulated run: QEMU {self.emulation.get('qemu')} -cpu {self.emulation.get('cpu')}, "
                         f"Python {res.get('python')} ({res.get('machine')}), "
                         + ", ".join(f"{k} {v[k]}" for k in ("numpy", "onnxruntime", "ai-edge-litert") if k in v))
            lines.append(f"  emulator time {self.emulated.wall_s:.1f} s for everything: QEMU speed is not device "
                         "speed, so no per-image latency is shown")
            show = {aid: self.emulated for aid in self.artifacts}
            source = "arm64, emulated"
        lines.append(f"\nper-image results ({source}):")
        header = f"{'image':<30}" + "".join(f"{aid:<26}" for aid in self.artifacts)
        lines.append(header)
        per_art = {aid: (run.result or {}).get("artifacts", {}).get(aid, {}).get("results", [])
                   for aid, run in show.items()}
        for i, src in enumerate(self.images):
            cells = []
            for aid in self.artifacts:
                rows = per_art.get(aid, [])
                r = rows[i] if i < len(rows) else None
                if r is None:
                    cells.append("-")
                elif r.get("error"):
                    cells.append(f"ERROR {r['error']['code']}")
                elif "probability" not in r:  # segmentation: vessel density, or ungradable
                    cells.append(f"{r['decision']:<10}" + (f" density {r['biomarkers']['density']:.4f}"
                                                           if r.get("biomarkers") else ""))
                else:
                    cells.append(f"{r['decision']:<9} p={r['probability']:.4f}")
            lines.append(f"{Path(src).name[:29]:<30}" + "".join(f"{c:<26}" for c in cells))
        if self.parities:
            lines.append("\nparity x86_64 vs arm64 (emulated):")
            lines += ["  " + par.row() for par in self.parities]
            for par in self.parities:
                lines += [f"    {par.artifact}: {f}" for f in par.failures]
                if not par.errors_agree:
                    lines.append(f"    {par.artifact}: different images failed on the two machines")
        lines.append(f"\nmemory (peak RSS measured in the x86_64 capped run) vs {p.name}:")
        lines += ["  " + f.row() for f in self.fits]
        lines.append("  (x86_64 libraries and allocator, not the device's: expect a few MB either way)")
        lines += [f"note: {n}" for n in self.notes]
        verdict = [f"fit {'PASS' if self.fits_ok else 'FAIL'}"]
        if self.parities:
            verdict.insert(0, f"parity {'PASS' if self.parity_ok else 'FAIL'}")
        lines.append("result: " + ", ".join(verdict))
        return "\n".join(lines)


def _emulator_times(result: dict[str, Any]) -> dict[str, Any]:
    """A per-image result of the emulated run, its timings renamed so nobody reads them as device latency."""
    r = dict(result)
    if "timings_ms" in r:
        r["emulator_timings_ms_not_device_latency"] = r.pop("timings_ms")
    return r


def select_artifacts(bundle: Bundle, ids: list[str] | None, fmt: str | None, precision: str | None) -> list[str]:
    if ids:
        return [bundle.artifact(i).id for i in ids]
    chosen = [a.id for a in bundle.artifacts
              if (fmt is None or a.format == fmt) and (precision is None or a.precision == precision)]
    if not chosen:
        raise UsageError(f"no {fmt or 'any'}/{precision or 'any'} artifact in this bundle; it has "
                         f"{[a.id for a in bundle.artifacts]}")
    return chosen


def _fit(aid: str, run: WorkerRun, plan: CapPlan, reserved: int) -> Fit:
    if run.ok and run.peak_rss_mb <= plan.budget_mb:
        how = "fits"
        fits = True
    elif run.ok:
        how = f"does NOT fit: {run.peak_rss_mb - plan.budget_mb:.0f} MB over the budget"
        fits = False
    elif run.killed_by == "memory-cap":
        how = ("does NOT fit: killed by the cgroup memory limit at the budget" if plan.memory_cap == "cgroup" else
               f"does NOT run within RLIMIT_AS = {plan.ram_mb} MB (address space; stricter than the device)")
        fits = False
    elif run.killed_by == "timeout" and plan.memory_cap == "rlimit":
        how = (f"does NOT run within RLIMIT_AS = {plan.ram_mb} MB: it hung (a backend thread could not allocate; "
               "address space is a stricter cap than the device's RAM)")
        fits = False
    else:
        raise EmulationError(f"the capped run of {aid} failed ({run.killed_by or f'exit {run.returncode}'}): "
                             f"{run.error}")
    return Fit(aid, run.peak_rss_mb, plan.budget_mb, plan.ram_mb, reserved, fits, how)


def want_emulation(profile: DeviceProfile, arch: str) -> bool:
    host = platform.machine().lower()
    if arch == "native":
        return False
    if arch == "aarch64":
        if profile.arch != "aarch64":
            raise UsageError(f"--arch aarch64 needs an Arm device profile; {profile.name} is {profile.arch}")
        return True
    return profile.arch == "aarch64" and host not in ("aarch64", "arm64")


def run_emulate(cfg: EmulateConfig, log: Log | None = None) -> EmulateReport:
    say: Log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if not cfg.images:
        raise UsageError("give at least one image (file or directory) to screen")
    bundle = load_bundle(cfg.bundle)
    selected = select_artifacts(bundle, cfg.artifacts, cfg.fmt, cfg.precision)
    here = runnable_formats()
    artifacts = [aid for aid in selected if bundle.artifact(aid).format in here]
    notes = [f"{aid} skipped: its backend ({BACKEND_FOR_FORMAT[fmt]}) is not installed here; {install_hint(fmt)}"
             for aid in selected if (fmt := bundle.artifact(aid).format) not in here]
    if not artifacts:
        fmt = bundle.artifact(selected[0]).format
        raise MissingDependencyError(BACKEND_FOR_FORMAT[fmt], EXTRA_FOR_FORMAT[fmt],
                                     f"Running the selected artifacts ({'; '.join(notes)})")
    p = cfg.profile
    ram = cfg.ram_mb if cfg.ram_mb is not None else min(p.memory.ram_mb)
    if ram <= p.memory.reserved_mb:
        raise UsageError(f"--ram-mb {ram} leaves nothing after the {p.memory.reserved_mb} MB {p.name} reserves")
    threads = p.runtime.threads if cfg.threads is None else cfg.threads
    plan = plan_caps(p.cpu.cores, threads, ram, p.memory.budget_mb(ram), cfg.memory_cap)
    report = EmulateReport(p, bundle, cfg.images, artifacts, plan, notes=notes)
    request = {"bundle": str(Path(cfg.bundle).resolve()), "images": [str(Path(i).resolve()) for i in cfg.images],
               "providers": list(p.runtime.providers)}
    n = len(cfg.images)
    cap_text = {"cgroup": f"cgroup v1 at the {plan.budget_mb} MB budget", "rlimit": f"RLIMIT_AS {plan.ram_mb} MB",
                "none": "none"}[plan.memory_cap]
    for aid in artifacts:
        say(f"capped x86_64 run of {aid}: {len(plan.cores)} cores, {plan.threads} threads, memory cap {cap_text}")
        run = run_worker(native_prefix(), {**request, "artifacts": [aid]}, plan=plan,
                         timeout=cfg.timeout or 120 + 5 * n)
        report.native[aid] = run
        report.fits.append(_fit(aid, run, plan, p.memory.reserved_mb))
    if want_emulation(p, cfg.arch):
        from .emuroot import open_root

        root = open_root(cfg.cache)
        emu_artifacts = artifacts
        if cfg.stack == "tflite-runtime":  # that wheel set has no onnxruntime (and numpy < 2)
            emu_artifacts = [a for a in artifacts if bundle.artifact(a).format == "tflite"]
            if not emu_artifacts:
                raise UsageError("--litert-package tflite-runtime runs tflite artifacts only; this selection has none")
            notes += [f"{a}: not run under emulation (the tflite-runtime wheel set has no onnxruntime)"
                      for a in artifacts if a not in emu_artifacts]
        emu_threads = min(plan.threads, len(plan.cores)) if plan.threads > 0 else len(plan.cores)
        cmd, env = root.python_command(p, [], stack=cfg.stack)
        report.emulation = {"qemu": root.qemu.version_str, "cpu": p.cpu.qemu_cpu, "stack": cfg.stack,
                            "threads": emu_threads, "root": str(root.base)}
        say(f"arm64 run under QEMU {root.qemu.version_str} -cpu {p.cpu.qemu_cpu}: {len(emu_artifacts)} artifact(s) "
            f"x {n} images (emulated: slow, and its speed says nothing about the device)")
        emu = run_worker(cmd, {**request, "artifacts": emu_artifacts, "threads": emu_threads}, env=env,
                         timeout=cfg.timeout or 300 + 30 * n * len(emu_artifacts))
        report.emulated = emu
        if not emu.ok:
            raise EmulationError(f"the emulated arm64 run failed ({emu.killed_by or f'exit {emu.returncode}'}): "
                                 f"{emu.error}")
        if (emu.result or {}).get("machine") != "aarch64":
            raise EmulationError(f"the emulated run reports machine {(emu.result or {}).get('machine')!r}")
        for aid in emu_artifacts:
            nat = report.native[aid]
            if not nat.ok:
                notes.append(f"{aid}: no parity (the capped native run did not finish)")
                continue
            art = bundle.artifact(aid)
            if bundle.spec.task == "segmentation":
                report.parities.append(seg_parity(aid, art.precision, nat.outputs, emu.outputs,
                                                  nat.result["artifacts"][aid]["results"] if nat.result else [],
                                                  (emu.result or {})["artifacts"][aid]["results"],
                                                  bundle.operating_point.threshold))
                continue
            report.parities.append(parity(
                aid, art.precision, nat.outputs[aid], emu.outputs[aid],
                nat.result["artifacts"][aid]["results"] if nat.result else [],
                (emu.result or {})["artifacts"][aid]["results"], bundle.positive_classes,
                bundle.operating_point.threshold, output_lsb(art.format, bundle.path(art))))
    return report


def exit_error(report: EmulateReport) -> Exception | None:
    """The error the command exits with (parity first, then fit), or None."""
    if not report.parity_ok:
        bad = [p.artifact for p in report.parities if not p]
        return ParityError(f"x86_64 vs emulated arm64 parity failed for {', '.join(bad)}")
    if not report.fits_ok:
        bad = [f.artifact for f in report.fits if not f.fits]
        return DeviceFitError(f"{', '.join(bad)} does not fit {report.profile.name} "
                              f"({report.plan.budget_mb} MB budget)")
    return None
