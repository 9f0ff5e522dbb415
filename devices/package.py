"""``fundus-edge package``: a self-contained folder (and tarball) that installs and screens with no network.

    dist/rpi4/
      wheelhouse/      fundus-edge + numpy, pillow, the device's backends and their dependencies, as wheels for
                       the device's platform and Python (host ``pip download --platform ... --only-binary=:all:``)
      requirements.txt every wheel pinned by version and sha256 (pip --require-hashes)
      bundle/          the verified bundle
      device.toml      the device config: [device] profile, chosen artifact, threads, provider order;
                       [security] trusted keys + require_signature when --trusted-keys is given
      trusted-keys/    the public keys (.pub) a signed bundle must verify against (with --trusted-keys)
      systemd/         a unit (default: a boot-time self-check; ``--unit-file`` puts in another, e.g. watch mode)
      install.sh       venv + ``pip install --no-index --find-links wheelhouse`` + bundle check
      SHA256SUMS       every file above
      package.json     what was packaged, for whom, and the sizes

:func:`install_emulated` proves a package by installing it into the emulated aarch64 root with the emulated
Python and screening with the installed runtime.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..bundle.read import load_bundle, sha256_file
from ..errors import DeviceError, EmulationError, MissingToolError, UsageError
from .choice import ArtifactChoice, choose_artifact
from .config import read_device_table, render_device_config
from .emuroot import GUEST_PYTHON, manylinux_platforms
from .profile import DeviceProfile

Log = Callable[[str], None]
TEMPLATES = Path(__file__).resolve().parent / "templates"
DEFAULT_UNIT = TEMPLATES / "fundus-edge-selfcheck.service"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
# The packages each fundus-edge extra adds (pyproject [project.optional-dependencies], device extras only).
EXTRA_DISTS = {"onnx": "onnxruntime", "litert": "ai-edge-litert"}


@dataclass
class PackageResult:
    out: Path
    tarball: Path | None
    choice: ArtifactChoice
    wheels: list[str]
    bytes: int
    wheelhouse_bytes: int
    seconds: float
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "tarball": str(self.tarball) if self.tarball else None,
                "artifact": self.choice.to_dict(), "wheels": self.wheels, "megabytes": round(self.bytes / 2**20, 1),
                "wheelhouse_megabytes": round(self.wheelhouse_bytes / 2**20, 1), "seconds": round(self.seconds, 1),
                "notes": self.notes}


def device_formats(profile: DeviceProfile) -> set[str]:
    """Artifact formats the device's own install runs: those whose extra (onnx, litert) the profile installs."""
    from ..runtime.backends import EXTRA_FOR_FORMAT

    return {fmt for fmt, extra in EXTRA_FOR_FORMAT.items() if extra in profile.install.extras}


def _pip(args: list[str], what: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        if "No module named pip" in r.stderr:
            raise MissingToolError(f"{sys.executable} has no pip; packaging needs the host pip to download wheels")
        tail = "\n".join(r.stderr.strip().splitlines()[-12:])
        raise DeviceError(f"{what} failed (is PyPI reachable?):\n{tail}")


def _host_version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _own_wheel(dest: Path, log: Log) -> Path:
    """The fundus-edge wheel: built from the source tree when there is one, else downloaded at this version."""
    if (PACKAGE_ROOT / "pyproject.toml").is_file():
        log(f"      building the fundus-edge wheel from {PACKAGE_ROOT}")
        try:
            import setuptools  # noqa: F401

            isolation = ["--no-build-isolation"]
        except ImportError:
            isolation = []
        with tempfile.TemporaryDirectory() as tmp:
            # Build from a clean copy: an in-tree build leaves build/ behind and can pack stale files from it.
            src = Path(tmp) / "src"
            shutil.copytree(PACKAGE_ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
                ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "demo-out", "out",
                "tests"))
            _pip(["wheel", "--quiet", "--no-deps", *isolation, "--wheel-dir", tmp, str(src)],
                 "building the fundus-edge wheel")
            built = sorted(Path(tmp).glob("fundus_edge-*.whl"))
            if not built:
                raise DeviceError("pip wheel produced no fundus_edge wheel")
            target = dest / built[0].name
            shutil.copy2(built[0], target)
            return target
    log(f"      downloading fundus-edge=={__version__}")
    _pip(["download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
          f"fundus-edge=={__version__}"], "downloading fundus-edge")
    return next(dest.glob("fundus_edge-*.whl"))


def _wheel_requires(wheel: Path, extras: tuple[str, ...], python: tuple[int, int]) -> list[str]:
    """Requirements of ``wheel`` for ``extras`` on the device's Python (markers evaluated for that Python)."""
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = zf.read(meta_name).decode()
    reqs = []
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req, _, marker = line[len("Requires-Dist:"):].strip().partition(";")
        marker = marker.strip()
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if extra and extra.group(1) not in extras:
            continue
        if extra is None and marker:
            m = re.fullmatch(r"python_version\s*(<|<=|>=|>|==)\s*['\"](\d+)\.(\d+)['\"]", marker)
            if m:
                op, ver = m.group(1), (int(m.group(2)), int(m.group(3)))
                keep = {"<": python < ver, "<=": python <= ver, ">=": python >= ver, ">": python > ver,
                        "==": python == ver}[op]
                if not keep:
                    continue
        elif extra is None and not marker:
            pass
        reqs.append(req.strip().replace(" ", ""))
    return reqs


def _pins(requirements: list[str], python: str) -> tuple[list[str], list[str]]:
    """Pin the runtime's packages to the host's versions when the device runs the emulation root's Python
    (those are the versions the emulated parity run checked); otherwise leave pip to pick and say so."""
    notes: list[str] = []
    if python != GUEST_PYTHON:
        notes.append(f"the device runs Python {python}, the emulation root {GUEST_PYTHON}: its wheels are the "
                     "newest compatible ones, not the versions checked under emulation")
        return requirements, notes
    out = []
    for req in requirements:
        name = re.split(r"[<>=!~\[]", req, maxsplit=1)[0]
        v = _host_version(name)
        out.append(f"{name}=={v}" if v else req)
    return out, notes


def _wheel_name_version(path: Path) -> tuple[str, str]:
    name, version = path.name.split("-")[:2]
    return name.replace("_", "-").lower(), version


def _render(template: str, values: dict[str, str]) -> str:
    for k, v in values.items():
        template = template.replace(f"@{k}@", v)
    return template


def _wheelhouse(profile: DeviceProfile, out: Path, wheelhouse: Path, secure: bool, extra_wheels: Path | None,
                notes: list[str], say: Log) -> tuple[Path, list[Path], list[str]]:
    """The fundus-edge wheel plus every dependency for the device's platform, and requirements.txt with hashes."""
    py = profile.install.python
    own = _own_wheel(wheelhouse, say)
    extras = (*profile.install.extras, "secure") if secure else profile.install.extras  # signature checks
    requirements = _wheel_requires(own, extras, profile.install.python_tuple)
    requirements, pin_notes = _pins(requirements, py)
    notes += pin_notes
    if extra_wheels:
        for w in sorted(Path(extra_wheels).glob("*.whl")):
            shutil.copy2(w, wheelhouse / w.name)
            notes.append(f"extra wheel {w.name} added from {extra_wheels}")
    plat_args = []
    if profile.arch == "x86_64":
        plats = manylinux_platforms("x86_64", profile.install.glibc_tuple)
    else:
        plats = manylinux_platforms("aarch64", profile.install.glibc_tuple)
    for p in plats:
        plat_args += ["--platform", p]
    say(f"      pip download {' '.join(requirements)} pip")
    _pip(["download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:", "--dest", str(wheelhouse),
          "--implementation", "cp", "--python-version", py, "--abi", "cp" + py.replace(".", ""), *plat_args,
          "--find-links", str(wheelhouse), *requirements, "pip"], f"downloading wheels for {profile.name}")
    wheels = sorted(wheelhouse.glob("*.whl"))
    lines = []
    for w in wheels:
        name, version = _wheel_name_version(w)
        if name == "pip":
            continue  # the installer runs pip from its wheel; the venv does not need it
        lines.append(f"{name}=={version} --hash=sha256:{sha256_file(w)}")
    (out / "requirements.txt").write_text("# generated by fundus-edge package; install with --require-hashes\n"
                                          + "\n".join(lines) + "\n")
    return own, wheels, plats


def _write_device_config(profile: DeviceProfile, bundle: Any, choice: Any, out: Path, keys: list[Path],
                         notes: list[str]) -> None:
    """device.toml: the profile, the bundle and its artifact, and (with trusted keys) the signature policy."""
    py = profile.install.python
    device = {"profile": profile.name, "bundle_id": bundle.bundle_id, "artifact": choice.artifact_id,
              "artifact_reason": choice.reason, "threads": profile.runtime.threads,
              "providers": list(profile.runtime.providers), "latency_budget_ms": profile.runtime.latency_budget_ms,
              "python": py, "arch": profile.arch, "fundus_edge": __version__}
    security = None
    if keys:
        (out / "trusted-keys").mkdir()
        for k in keys:
            shutil.copy2(k, out / "trusted-keys" / k.name)
        security = {"trusted_keys": "trusted-keys", "require_signature": True}
        notes.append(f"signatures required: the device runs only bundles signed by {', '.join(k.stem for k in keys)}")
    (out / "device.toml").write_text(render_device_config(
        device, security, comment=f"fundus-edge device config for {profile.name}, written by 'fundus-edge package'.\n"
                                  "Use with: fundus-edge screen --device-config device.toml ..."))


def build_package(profile: DeviceProfile, bundle_dir: Path, out: Path, unit_file: Path | None = None,
                  extra_wheels: Path | None = None, tarball: bool = True, force: bool = False,
                  trusted_keys: Path | None = None, log: Log | None = None) -> PackageResult:
    say: Log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    if not profile.supported:
        raise DeviceError(f"cannot package for {profile.name}: {profile.unsupported}")
    unit = unit_file or DEFAULT_UNIT
    if not unit.is_file():
        raise UsageError(f"--unit-file {unit} does not exist")
    bundle = load_bundle(bundle_dir)
    # the package installs the profile's extras on the device: what this (build) machine has does not matter
    choice = choose_artifact(profile, bundle.artifacts, bundle.spec, device_formats(profile))
    keys = sorted(Path(trusted_keys).glob("*.pub")) if trusted_keys else []
    if trusted_keys and (not keys or any(Path(trusted_keys).glob("*.key"))):
        raise UsageError(f"--trusted-keys {trusted_keys} must hold public keys (.pub) and no private key (.key)")
    if out.exists() and any(out.iterdir()):
        if not force:
            raise UsageError(f"{out} exists and is not empty; choose another --out or pass --force")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    wheelhouse = out / "wheelhouse"
    wheelhouse.mkdir()
    py = profile.install.python
    notes: list[str] = []

    say(f"[1/4] wheelhouse for {profile.name}: Python {py}, {profile.arch}, glibc {profile.install.glibc}")
    own, wheels, plats = _wheelhouse(profile, out, wheelhouse, bool(keys), extra_wheels, notes, say)
    own_name = own.name

    say(f"[2/4] bundle {bundle.bundle_id} -> {out / 'bundle'} (artifact for {profile.name}: {choice.artifact_id})")
    shutil.copytree(bundle.root, out / "bundle")
    load_bundle(out / "bundle")  # the copy verifies
    _write_device_config(profile, bundle, choice, out, keys, notes)

    say("[3/4] installer and service unit")
    values = {"DEVICE": profile.name, "DESCRIPTION": profile.description, "PYTHON": py, "ARCH": profile.arch,
              "ARTIFACT": choice.artifact_id, "THREADS": str(profile.runtime.threads), "BUNDLE": "@PREFIX@/bundle",
              "CONFIG": "@PREFIX@/device.toml"}
    (out / "install.sh").write_text(_render((TEMPLATES / "install.sh").read_text(), values))
    (out / "install.sh").chmod(0o755)
    (out / "systemd").mkdir()
    (out / "systemd" / unit.name).write_text(_render(unit.read_text(), values))

    files = sorted(p for p in out.rglob("*") if p.is_file())
    (out / "SHA256SUMS").write_text("".join(f"{sha256_file(p)}  {p.relative_to(out)}\n" for p in files))
    wheelhouse_bytes = sum(w.stat().st_size for w in wheelhouse.glob("*.whl"))
    summary = {"device": profile.name, "fundus_edge_wheel": own_name, "wheels": [w.name for w in wheels],
               "platforms": plats, "python": py, "bundle_id": bundle.bundle_id, "artifact": choice.to_dict(),
               "unit": unit.name, "notes": notes, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (out / "package.json").write_text(json.dumps(summary, indent=2) + "\n")
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    tar_path = None
    if tarball:
        tar_path = out.parent / f"{out.name}.tar.gz"
        say(f"[4/4] tarball {tar_path}")
        with tarfile.open(tar_path, "w:gz", compresslevel=6) as tf:
            tf.add(out, arcname=out.name)
    else:
        say("[4/4] no tarball (--no-tarball)")
    return PackageResult(out, tar_path, choice, [w.name for w in wheels], total, wheelhouse_bytes,
                         time.perf_counter() - t0, notes)


# ------------------------------------------------------------------------------------ proof under emulation
@dataclass
class EmulatedInstall:
    prefix: Path
    install_seconds: float
    screen: dict[str, Any]
    screen_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"prefix": str(self.prefix), "install_emulator_seconds": round(self.install_seconds, 1),
                "screen": self.screen, "screen_emulator_seconds_not_device_latency": round(self.screen_seconds, 1)}


def install_emulated(package: Path, profile: DeviceProfile, images: list[str], prefix: Path | None = None,
                     cache: Path | None = None, log: Log | None = None) -> EmulatedInstall:
    """Run the package's install.sh with the emulated arm64 Python, then screen ``images`` with the install."""
    from .emuroot import open_root

    say: Log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if profile.arch != "aarch64":
        raise UsageError(f"{profile.name} is not an Arm device; install its package natively")
    cfg = read_device_table(package / "device.toml")
    if cfg.get("python") != GUEST_PYTHON:
        raise UsageError(f"the package is for Python {cfg.get('python')}; the emulation root has {GUEST_PYTHON}")
    root = open_root(cache)
    view = root.view(profile)
    run = root.qemu.command(profile.cpu.qemu_cpu, view, view / "usr/bin/true", [])[:-1]  # qemu -cpu X -L view
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "QEMU_", "LD_"))}
    env.update({"FUNDUS_EDGE_RUN": " ".join(run), "PYTHON": str(view / root.python.lstrip("/")),
                "LC_ALL": "C.UTF-8", "PIP_NO_COMPILE": "1"})
    prefix = prefix or Path(tempfile.mkdtemp(prefix="fundus-edge-emulated-install-"))
    say(f"installing {package} into {prefix} with the arm64 Python under QEMU -cpu {profile.cpu.qemu_cpu}")
    t = time.perf_counter()
    r = subprocess.run(["sh", str(package / "install.sh"), str(prefix)], capture_output=True, text=True, env=env,
                       timeout=1800)
    install_s = time.perf_counter() - t
    if r.returncode != 0:
        raise EmulationError(f"install.sh failed under emulation (exit {r.returncode}):\n{r.stderr[-3000:]}")
    say(f"screening {len(images)} image(s) with {prefix}/venv (emulated)")
    t = time.perf_counter()
    cmd = [*run, str(prefix / "venv/bin/python"), "-m", "fundus_edge", "screen", "--device-config",
           str(prefix / "device.toml"), "--bundle", str(prefix / "bundle"), "--json",
           *[str(Path(i).resolve()) for i in images]]
    s_env = {k: v for k, v in env.items() if k not in ("FUNDUS_EDGE_RUN", "PYTHON")}
    r = subprocess.run(cmd, capture_output=True, text=True, env=s_env, timeout=1800)
    screen_s = time.perf_counter() - t
    try:
        doc = json.loads(r.stdout)
    except ValueError as exc:
        raise EmulationError(f"screening with the installed package failed (exit {r.returncode}):\n"
                             f"{r.stderr[-3000:]}") from exc
    if r.returncode not in (0, 10):
        raise EmulationError(f"screening with the installed package exited {r.returncode}: {r.stderr[-2000:]}")
    return EmulatedInstall(prefix, install_s, doc, screen_s)
