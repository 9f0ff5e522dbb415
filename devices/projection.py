"""Device projection of inference latency from a model's MACs: a projection, not a measurement.

For one image of a model with ``M`` multiply-accumulates, on a device whose profile has ``[compute]``:

    bound_ms      = M / (cores x clock_hz x macs_per_cycle[precision]) x 1e3
    projected_ms  = bound_ms / efficiency[precision]

``cores`` is the number of inference threads the profile runs (``runtime.threads``; 0 means all cores), at most
the device's cores; ``clock_hz`` is the profile's ``cpu.max_freq_khz`` x 1e3; ``macs_per_cycle`` is the peak of
one core at that precision (int8 artifacts: int8; fp32 and fp16: fp32). The bound is physical: no schedule
of the network's arithmetic on those cores at that clock can be faster (it ignores memory, which only adds).
The efficiency is the bound divided by a published (or, where the profile says so, assumed) latency of real
networks on that device. Example, ResNet-18 int8 at 224 x 224 (1.814 GMAC):

    Pi 4 (4 x Cortex-A72 at 1.8 GHz, 8 int8 MACs/cycle):  1.814e9 / (4 x 1.8e9 x 8)  = 31.5 ms
    Pi 5 (4 x Cortex-A76 at 2.4 GHz, 32 int8 MACs/cycle): 1.814e9 / (4 x 2.4e9 x 32) = 5.9 ms

Only the network is projected: decoding and preprocessing are measured by ``bench`` on this machine and are
not scaled to the device (they depend on the JPEG decoder's SIMD code, memory bandwidth and the image).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from .profile import DeviceProfile, get_profile

DEFAULT_DEVICES = ("rpi4", "rpi5", "jetson-orin-nano")
LABEL = "projection, not a measurement"


@dataclass(frozen=True)
class Projection:
    """Projected inference latency of one artifact on one device."""

    device: str
    artifact: str
    precision: str
    macs: int
    cores: int
    clock_ghz: float
    peak_gmacs: float  # all `cores` together, at this precision
    bound_ms: float
    efficiency: float
    projected_ms: float
    efficiency_source: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label"] = LABEL
        return d


def bound_ms(macs: float, cores: int, clock_hz: float, macs_per_cycle: float) -> float:
    """Lower bound of one inference in ms: ``macs / (cores x clock_hz x macs_per_cycle)``."""
    return macs / (cores * clock_hz * macs_per_cycle) * 1e3


def project(profile: DeviceProfile, macs: int, precision: str, artifact: str = "") -> Projection | None:
    """The projection for ``profile``; None when the profile has no ``[compute]`` table."""
    c = profile.compute
    if c is None:
        return None
    threads = profile.runtime.threads or profile.cpu.cores
    cores = max(1, min(threads, profile.cpu.cores))
    clock_hz = profile.cpu.max_freq_khz * 1e3
    per_cycle = c.macs_per_cycle(precision)
    b = bound_ms(macs, cores, clock_hz, per_cycle)
    eff = c.efficiency(precision)
    return Projection(device=profile.name, artifact=artifact, precision=precision, macs=int(macs), cores=cores,
                      clock_ghz=clock_hz / 1e9, peak_gmacs=cores * clock_hz * per_cycle / 1e9, bound_ms=b,
                      efficiency=eff, projected_ms=b / eff, efficiency_source=c.efficiency_source)


def project_artifacts(macs: int | None, artifacts: list[tuple[str, str]],
                      devices: tuple[str, ...] | list[str] = DEFAULT_DEVICES) -> list[Projection]:
    """Projections for (artifact id, precision) pairs on ``devices`` (names or profile files)."""
    if macs is None:
        return []
    out = []
    for name in devices:
        profile = get_profile(name)
        for artifact, precision in artifacts:
            p = project(profile, macs, precision, artifact)
            if p is not None:
                out.append(p)
    return out


def format_projection(projections: list[Projection], macs: int | None, macs_source: str,
                      devices: tuple[str, ...] | list[str] = DEFAULT_DEVICES) -> str:
    """The projection table: one row per artifact, per device ``>= bound / ~projected`` in ms."""
    head = f"Device projection of inference ({LABEL}): "
    if macs is None:
        return head + f"n/a ({macs_source})"
    lines = [head + f"{macs / 1e9:.3f} GMAC per image ({macs_source})"]
    by = {(p.artifact, p.device): p for p in projections}
    shown = [d for d in devices if any(p.device == get_profile(d).name for p in projections)]
    names = [get_profile(d).name for d in shown]
    artifacts = list(dict.fromkeys(p.artifact for p in projections))
    widths = [max(len(n) + 15, 20) for n in names]
    heads = (f"{n + ' bound/proj ms':>{w}}" for n, w in zip(names, widths, strict=True))
    lines.append(f"{'artifact':<12} " + " ".join(heads))
    for a in artifacts:
        cells = []
        for n, w in zip(names, widths, strict=True):
            p = by.get((a, n))
            cell = f">= {p.bound_ms:.1f} / ~{p.projected_ms:.1f}" if p else "n/a"
            cells.append(f"{cell:>{w}}")
        lines.append(f"{a:<12} " + " ".join(cells))
    lines.append("bound = MACs / (cores x clock x peak MACs per cycle per core at the artifact's precision): no "
                 "device can be faster; proj = bound / efficiency")
    for n in names:
        p = next(p for p in projections if p.device == n)
        per = {q.precision: q for q in projections if q.device == n}
        peaks = ", ".join(f"{prec} {q.peak_gmacs:.0f} GMAC/s (efficiency {q.efficiency:.2f})"
                          for prec, q in sorted(per.items()))
        lines.append(f"  {n}: {p.cores} cores x {p.clock_ghz:.2f} GHz, {peaks}; {p.efficiency_source}")
    lines.append("  inference only; decode and preprocessing are not projected (measure them on the device); the "
                 "efficiencies come from ResNet-18-sized networks, small networks usually reach less of the peak")
    return "\n".join(lines)
