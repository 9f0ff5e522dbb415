"""Commands ``devices``, ``doctor``, ``emulate`` (and ``emulate setup``) and ``package``.

Registered from the top-level CLI through ``COMMAND_MODULES``. Everything heavy is imported inside the
command functions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError
from .output import emit, refuse_word_as_path


def _log(args: argparse.Namespace) -> Any:
    return lambda s: print(s, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- devices
def cmd_devices(args: argparse.Namespace) -> int:
    from ..devices.profile import get_profile, list_profiles

    if args.name:
        p = get_profile(args.name)
        inst = p.install
        lines = [f"{p.name}: {p.description}",
                 f"  arch {p.arch}, {p.cpu.cores}x {p.cpu.model}" + (f" (QEMU -cpu {p.cpu.qemu_cpu})"
                                                                      if p.cpu.qemu_cpu else ""),
                 f"  RAM {'/'.join(str(r) for r in p.memory.ram_mb)} MB; {p.memory.reserved_mb} MB reserved for the "
                 f"OS -> budget {p.memory.budget_mb()} MB on the smallest",
                 f"  artifacts (preferred first): {', '.join(map(str, p.runtime.artifacts))}",
                 f"  backends {', '.join(p.runtime.backends)}; providers {' -> '.join(p.runtime.providers)}; threads "
                 f"{p.runtime.threads or 'auto'}; latency budget {p.runtime.latency_budget_ms:g} ms (a target)",
                 f"  install: {inst.os}, Python {inst.python}, glibc {inst.glibc}, numpy {inst.numpy}",
                 f"    {inst.pip}"]
        lines += [f"    note: {n}" for n in inst.notes]
        if not p.supported:
            lines.append(f"  UNSUPPORTED: {p.unsupported}")
        emit(args, p.to_dict(), "\n".join(lines))
        return 0
    profiles = list_profiles()
    rows = [f"{'device':<18} {'arch':<8} {'cores':<26} {'RAM MB':<20} {'preferred':<13} {'threads':<7} status"]
    for p in profiles:
        rows.append(f"{p.name:<18} {p.arch:<8} {f'{p.cpu.cores}x {p.cpu.model}':<26} "
                    f"{'/'.join(map(str, p.memory.ram_mb)):<20} {p.runtime.artifacts[0]!s:<13} "
                    f"{p.runtime.threads or 'auto'!s:<7} {'ok' if p.supported else 'UNSUPPORTED'}")
    rows.append("details: fundus-edge devices NAME")
    emit(args, [p.to_dict() for p in profiles], "\n".join(rows))
    return 0


# ---------------------------------------------------------------------------------------------- doctor
def cmd_doctor(args: argparse.Namespace) -> int:
    from ..devices.doctor import run_doctor

    rep = run_doctor(args.device, Path(args.root), in_process=args.in_process)
    emit(args, rep.to_dict(), rep.text())
    return rep.exit_code


# --------------------------------------------------------------------------------------------- emulate
def _setup(args: argparse.Namespace) -> int:
    from ..devices.emuroot import DEFAULT_MIRROR, setup

    res = setup(cache=args.cache_dir, mirror=args.mirror or DEFAULT_MIRROR, force=args.force, log=_log(args))
    d = res.to_dict()
    reused = res.rootfs_reused and all(res.sites_reused.values())
    text = (f"emulation root ready in {res.seconds:.1f} s ({'cached' if reused else 'built'}): {res.base}\n"
            f"  QEMU {res.qemu}; {d['megabytes']} MB on disk\n"
            f"  arm64 guest: " + ", ".join(f"{k} {v}" for k, v in res.versions.items()))
    emit(args, d, text)
    return 0


def _outcome(r: dict[str, Any]) -> str:
    """One screening result in a few words: the decision and probability, or (segmentation) the vessel density."""
    if "probability" in r:
        return f"{r['decision']:<9} p={r['probability']:.4f}"
    bio = r.get("biomarkers")
    return f"{r['decision']:<10}" + (f" vessel density {bio['density']:.4f}" if bio else "")


def cmd_emulate(args: argparse.Namespace) -> int:
    if args.inputs == ["setup"] and args.bundle is None and args.install_package is None:
        return _setup(args)
    refuse_word_as_path(args.inputs[0] if args.inputs else None, ("setup",), "emulate")
    from ..devices.profile import get_profile
    from ..runtime import expand_inputs

    if args.device is None:
        raise UsageError("emulate needs --device NAME (see 'fundus-edge devices'), or 'emulate setup'")
    profile = get_profile(args.device)
    images = expand_inputs(args.inputs)
    if args.install_package is not None:
        from ..devices.package import install_emulated

        res = install_emulated(args.install_package, profile, images, prefix=args.prefix, cache=args.cache_dir,
                               log=_log(args))
        doc = res.screen
        lines = [f"installed {args.install_package} into {res.prefix} with the arm64 Python (QEMU -cpu "
                 f"{profile.cpu.qemu_cpu}); screened with the installed runtime, artifact {doc.get('artifact')} "
                 f"({doc.get('backend')}):"]
        for r in doc.get("results", []):
            name = Path(r["source"]).name
            lines.append(f"  {name:<30} " + (f"ERROR {r['error']['code']}" if r.get("error") else _outcome(r)))
        s = doc.get("summary", {})
        counts = (f"{s.get('segmented')} segmented, {s.get('ungradable')} ungradable" if "segmented" in s else
                  f"{s.get('refer')} refer, {s.get('no_refer')} no-refer")
        lines.append(f"{s.get('n')} images: {counts}, {s.get('errors')} errors (emulator time: install "
                     f"{res.install_seconds:.0f} s, screen {res.screen_seconds:.0f} s; not device speed)")
        emit(args, res.to_dict(), "\n".join(lines))
        return 0 if s.get("errors") == 0 else 10
    if args.bundle is None:
        raise UsageError("emulate needs --bundle DIR and images (or 'emulate setup')")
    from ..devices.emulate import EmulateConfig, exit_error, run_emulate

    cfg = EmulateConfig(profile=profile, bundle=args.bundle, images=images, artifacts=args.artifact,
                        fmt=args.format, precision=args.precision, ram_mb=args.ram_mb, memory_cap=args.memory_cap,
                        arch=args.arch, threads=args.threads,
                        stack="tflite-runtime" if args.litert_package == "tflite-runtime" else "default",
                        cache=args.cache_dir)
    report = run_emulate(cfg, log=_log(args))
    emit(args, report.to_dict(), report.text())
    err = exit_error(report)
    if err is not None:
        print(f"fundus-edge: error: {err}", file=sys.stderr)
        return int(getattr(err, "exit_code", 1))
    return 0


# --------------------------------------------------------------------------------------------- package
def cmd_package(args: argparse.Namespace) -> int:
    from ..devices.package import build_package
    from ..devices.profile import get_profile

    res = build_package(get_profile(args.device), args.bundle, args.out, unit_file=args.unit_file,
                        extra_wheels=args.extra_wheels, tarball=not args.no_tarball, force=args.force,
                        trusted_keys=args.trusted_keys, log=_log(args))
    d = res.to_dict()
    text = (f"package for {args.device}: {res.out} ({d['megabytes']} MB; wheelhouse {d['wheelhouse_megabytes']} MB, "
            f"{len(res.wheels)} wheels)" + (f"\n  tarball {res.tarball}" if res.tarball else "")
            + f"\n  artifact {res.choice.artifact_id}: {res.choice.reason}"
            + "".join(f"\n  note: {n}" for n in res.notes)
            + f"\n  on the device: sh install.sh [/opt/fundus-edge]   (offline; {res.seconds:.0f} s to package)")
    emit(args, d, text)
    return 0


def register(sub: Any) -> None:
    d = sub.add_parser("devices", help="list the device profiles, or show one")
    d.add_argument("name", nargs="?", help="a device name (e.g. rpi4) or a profile .toml file")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_devices)

    o = sub.add_parser("doctor", help="which device is this, which backends import, what to install")
    o.add_argument("--device", help="check against this profile instead of the detected one")
    o.add_argument("--root", default="/", help="read the device signature files under this directory")
    o.add_argument("--in-process", action="store_true", help="import backends in this process (no child)")
    o.add_argument("--json", action="store_true")
    o.set_defaults(func=cmd_doctor)

    e = sub.add_parser("emulate", help="'emulate setup' builds the arm64 root; 'emulate --device D --bundle B IMAGES' "
                                       "runs a bundle as the device would (capped, and under QEMU for Arm)")
    e.add_argument("inputs", nargs="*", help="image files or directories; or the word 'setup'")
    e.add_argument("--device", help="device profile (see 'fundus-edge devices')")
    e.add_argument("--bundle", type=Path)
    e.add_argument("--artifact", action="append", help="artifact id (repeatable; default: all the runtime can run)")
    e.add_argument("--format", choices=["onnx", "tflite"])
    e.add_argument("--precision", choices=["fp32", "int8"])
    e.add_argument("--ram-mb", type=int, help="the device's RAM variant (default: its smallest)")
    e.add_argument("--memory-cap", choices=["auto", "cgroup", "rlimit", "none"], default="auto")
    e.add_argument("--arch", choices=["auto", "native", "aarch64"], default="auto",
                   help="auto: emulate aarch64 for an Arm device on an x86 host; native: capped run only")
    e.add_argument("--threads", type=int, help="override the profile's thread count")
    e.add_argument("--litert-package", choices=["ai-edge-litert", "tflite-runtime"], default="ai-edge-litert",
                   help="which LiteRT wheel set the emulated run uses for tflite artifacts")
    e.add_argument("--prefix", type=Path, help="--install-package: install here (default: a new temporary "
                   "directory, kept for inspection)")
    e.add_argument("--install-package", type=Path,
                   help="install this 'fundus-edge package' output in the emulated root and screen with it")
    e.add_argument("--cache-dir", type=Path, help="emulation cache (default: $XDG_CACHE_HOME/fundus-edge)")
    e.add_argument("--mirror", help="Debian mirror for 'emulate setup'")
    e.add_argument("--force", action="store_true", help="'emulate setup': rebuild even when cached")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_emulate)

    k = sub.add_parser("package", help="an offline install package for a device: wheelhouse + bundle + installer")
    k.add_argument("--device", required=True)
    k.add_argument("--bundle", required=True, type=Path)
    k.add_argument("--out", required=True, type=Path)
    k.add_argument("--unit-file", type=Path, help="systemd unit to ship (default: a boot-time self-check)")
    k.add_argument("--extra-wheels", type=Path, help="a folder of extra wheels (e.g. Jetson onnxruntime-gpu)")
    k.add_argument("--trusted-keys", type=Path, metavar="DIR",
                   help="public keys (.pub): the device then runs only bundles signed by one of them")
    k.add_argument("--no-tarball", action="store_true")
    k.add_argument("--force", action="store_true")
    k.add_argument("--json", action="store_true")
    k.set_defaults(func=cmd_package)
