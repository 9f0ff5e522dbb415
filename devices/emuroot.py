"""``fundus-edge emulate setup``: an arm64 Debian root with Python and the aarch64 runtime wheels, cached.

Layout under ``$XDG_CACHE_HOME/fundus-edge`` (or ``~/.cache/fundus-edge``)::

    emulation/aarch64-bookworm/
        rootfs/            debootstrap --arch=arm64 --variant=minbase --foreign --include=python3.11, every
                           .deb unpacked with dpkg-deb -x (no chroot, no binfmt_misc, no second stage)
        rootfs.json        what it was built from
        sites/<stack>/     aarch64 wheels installed by the host pip (--platform ... --only-binary=:all: --target)
        sites/<stack>.json
        views/<profile>/   the root as that device sees it: links to rootfs/* plus its own fake proc/ and sys/
        pkg/<key>/fundus_edge -> the fundus_edge package being run

Each part is rebuilt only when its recipe changes, so a second ``setup`` takes seconds.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import EmulationError, MissingToolError
from .cpufiles import write_cpu_files
from .profile import DeviceProfile
from .qemu import Qemu, find_qemu, find_tool

Log = Callable[[str], None]

RECIPE_VERSION = 1
SUITE = "bookworm"
GUEST_PYTHON = "3.11"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
GLIBC = (2, 36)  # bookworm
PRUNE = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
         "var/cache/apt/archives", "debootstrap")


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fundus-edge"


def manylinux_platforms(arch: str, glibc: tuple[int, int]) -> list[str]:
    """pip ``--platform`` tags a system with this glibc accepts (pip does not expand them itself)."""
    tags = [f"manylinux_{glibc[0]}_{m}_{arch}" for m in range(glibc[1], 16, -1)]
    return [*tags, f"manylinux2014_{arch}"]


def _host_version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _pin(dist: str) -> str:
    v = _host_version(dist)
    return f"{dist}=={v}" if v else dist


def stack_requirements() -> dict[str, list[str]]:
    """Wheel sets for the emulated runtime, pinned to the host's versions so parity compares like with like.

    ``default``: numpy, pillow, onnxruntime, ai-edge-litert. ``tflite-runtime``: the older LiteRT package,
    which needs numpy < 2 (kept apart so the default stack can use numpy 2).
    """
    return {"default": [_pin("numpy"), _pin("pillow"), _pin("onnxruntime"), _pin("ai-edge-litert")],
            "tflite-runtime": ["numpy<2", _pin("pillow"), "tflite-runtime==2.14.0"]}


@dataclass
class SetupResult:
    base: Path
    qemu: str
    seconds: float
    rootfs_reused: bool
    sites_reused: dict[str, bool]
    bytes: int
    versions: dict[str, str] = field(default_factory=dict)
    steps: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"cache": str(self.base), "qemu": self.qemu, "seconds": round(self.seconds, 1),
                "rootfs_reused": self.rootfs_reused, "sites_reused": self.sites_reused,
                "megabytes": round(self.bytes / 2**20, 1), "guest_versions": self.versions,
                "steps_seconds": {k: round(v, 1) for k, v in self.steps.items()}}


def _dir_bytes(path: Path) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _run(cmd: list[str], what: str, timeout: float = 900, env: dict[str, str] | None = None) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        raise EmulationError(f"{what} timed out after {timeout:.0f} s: {' '.join(cmd[:4])} ...") from exc
    if r.returncode != 0:
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
        raise EmulationError(f"{what} failed (exit {r.returncode}): {' '.join(cmd[:6])} ...\n{tail}")
    return r.stdout


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stamp_ok(stamp: Path, want: dict[str, Any]) -> bool:
    try:
        have = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    return all(have.get(k) == v for k, v in want.items())


class EmulationRoot:
    """A built emulation root (see the module docstring). Use :func:`open_root` or :func:`setup`."""

    def __init__(self, base: Path, qemu: Qemu) -> None:
        self.base = base
        self.qemu = qemu
        self.rootfs = base / "rootfs"

    @property
    def python(self) -> str:
        return f"/usr/bin/python{GUEST_PYTHON}"

    def site(self, stack: str = "default") -> Path:
        path = self.base / "sites" / stack
        if not (path.is_dir() and (self.base / "sites" / f"{stack}.json").is_file()):
            raise EmulationError(f"the emulation root has no '{stack}' wheel set; run 'fundus-edge emulate setup'")
        return path

    def view(self, profile: DeviceProfile) -> Path:
        """The root as ``profile`` sees it: links to the shared rootfs plus the device's fake CPU files."""
        # A hard-linked copy, not symlinks: a guest resolving "/tmp/x" or "/root/x" must see a real directory
        # there (QEMU maps a path into the root only when it exists in it), or host paths stop resolving.
        view = self.base / "views" / profile.name
        built = (self.base / "rootfs.json").read_text()
        stamp = view / ".fundus-edge-view"
        if not (stamp.is_file() and stamp.read_text() == built):
            tmp = self.base / "views" / f".{profile.name}.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.rootfs, tmp, symlinks=True, copy_function=os.link)
            (tmp / ".fundus-edge-view").write_text(built)
            shutil.rmtree(view, ignore_errors=True)
            tmp.rename(view)
        write_cpu_files(view, profile)
        return view

    def package_path(self) -> Path:
        """A directory whose ``fundus_edge`` entry is the package being run (a repo root or an install)."""
        pkg_root = Path(__file__).resolve().parent.parent
        key = hashlib.sha1(str(pkg_root).encode()).hexdigest()[:12]
        d = self.base / "pkg" / key
        d.mkdir(parents=True, exist_ok=True)
        link = d / "fundus_edge"
        if not (link.is_symlink() and Path(os.readlink(link)) == pkg_root):
            tmp = d / f".fundus_edge.{os.getpid()}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(pkg_root)
            tmp.replace(link)
        return d

    def python_command(self, profile: DeviceProfile, args: list[str], stack: str = "default",
                       extra_path: list[Path] | None = None) -> tuple[list[str], dict[str, str]]:
        """argv and environment that run the guest Python as ``profile``'s CPU, with the runtime importable."""
        view = self.view(profile)
        cmd = self.qemu.command(profile.cpu.qemu_cpu, view, view / self.python.lstrip("/"), args)
        path = [str(self.package_path()), str(self.site(stack)), *(str(p) for p in extra_path or [])]
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PYTHON", "VIRTUAL_ENV", "QEMU_", "LD_"))}
        env.update({"PYTHONPATH": os.pathsep.join(path), "PYTHONNOUSERSITE": "1", "LC_ALL": "C.UTF-8"})
        return cmd, env


def open_root(cache: Path | None = None) -> EmulationRoot:
    base = (cache or cache_root()) / "emulation" / f"aarch64-{SUITE}"
    if not (base / "rootfs.json").is_file():
        raise EmulationError(f"no aarch64 emulation root in {base}; build it once with 'fundus-edge emulate setup' "
                             "(about a minute; needs network access to the Debian mirror and PyPI)")
    return EmulationRoot(base, find_qemu("aarch64"))


# --------------------------------------------------------------------------------------------- building
def _debootstrap(target: Path, mirror: str, log: Log) -> None:
    cmd = [find_tool("debootstrap"), "--arch=arm64", "--variant=minbase", "--foreign",
           f"--include=python{GUEST_PYTHON}", SUITE, str(target), mirror]
    if os.geteuid() != 0:
        fakeroot = shutil.which("fakeroot")
        if not fakeroot:
            raise MissingToolError("debootstrap must run as root or under fakeroot; install fakeroot "
                                   "(apt-get install fakeroot) or run 'fundus-edge emulate setup' as root")
        cmd = [fakeroot, *cmd]
    log(f"      debootstrap {SUITE} arm64 (minbase + python{GUEST_PYTHON}) from {mirror}")
    _run(cmd, "debootstrap (is the Debian mirror reachable?)", timeout=900)
    debs = sorted((target / "var/cache/apt/archives").glob("*.deb"))
    if not debs:
        raise EmulationError(f"debootstrap left no packages in {target}/var/cache/apt/archives")
    dpkg_deb = find_tool("dpkg-deb")
    log(f"      unpacking {len(debs)} packages with dpkg-deb -x")
    for deb in debs:
        _run([dpkg_deb, "-x", str(deb), str(target)], f"dpkg-deb -x {deb.name}")
    for rel in PRUNE:
        shutil.rmtree(target / rel, ignore_errors=True)
    if not (target / "usr/bin" / f"python{GUEST_PYTHON}").is_file():
        raise EmulationError(f"python{GUEST_PYTHON} is missing from the unpacked root {target}")


def _pip_target(target: Path, requirements: list[str], log: Log) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts",
           "--no-input", "--target", str(target), "--only-binary=:all:", "--implementation", "cp",
           "--python-version", GUEST_PYTHON, "--abi", "cp" + GUEST_PYTHON.replace(".", "")]
    for plat in manylinux_platforms("aarch64", GLIBC):
        cmd += ["--platform", plat]
    log(f"      pip (host) -> aarch64 wheels: {' '.join(requirements)}")
    try:
        _run([*cmd, *requirements], "pip install of the aarch64 wheels (is PyPI reachable?)", timeout=900)
    except EmulationError as exc:
        if "No module named pip" in str(exc):
            raise MissingToolError(f"the host Python {sys.executable} has no pip; install it to build the "
                                   "emulation root") from exc
        raise


def _smoke(root: EmulationRoot, profile: DeviceProfile) -> dict[str, str]:
    code = ("import json, platform, numpy, PIL, onnxruntime\n"
            "v = {'machine': platform.machine(), 'python': platform.python_version(), 'numpy': numpy.__version__,"
            " 'pillow': PIL.__version__, 'onnxruntime': onnxruntime.__version__}\n"
            "try:\n"
            "    from ai_edge_litert import interpreter\n"
            "    import importlib.metadata as md\n"
            "    v['ai-edge-litert'] = md.version('ai-edge-litert')\n"
            "except ImportError as e:\n"
            "    v['ai-edge-litert'] = 'not importable: %s' % e\n"
            "print(json.dumps(v))\n")
    cmd, env = root.python_command(profile, ["-c", code])
    out = _run(cmd, f"importing the runtime under qemu-aarch64 -cpu {profile.cpu.qemu_cpu}", timeout=600, env=env)
    versions: dict[str, str] = json.loads(out.strip().splitlines()[-1])
    if versions.get("machine") != "aarch64":
        raise EmulationError(f"the emulated Python reports machine {versions.get('machine')!r}, not aarch64")
    return versions


def setup(cache: Path | None = None, mirror: str = DEFAULT_MIRROR, force: bool = False,
          stacks: tuple[str, ...] = ("default", "tflite-runtime"), smoke_profile: DeviceProfile | None = None,
          log: Log | None = None) -> SetupResult:
    """Build (or reuse) the emulation root. Raises :class:`MissingToolError` / :class:`EmulationError`."""
    say: Log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    qemu = find_qemu("aarch64")
    find_tool("debootstrap")
    find_tool("dpkg-deb")
    base = (cache or cache_root()) / "emulation" / f"aarch64-{SUITE}"
    steps: dict[str, float] = {}
    with _locked(base / ".lock"):
        say(f"[1/3] emulation root in {base} (QEMU {qemu.version_str}, {qemu.path})")
        root_want = {"recipe": RECIPE_VERSION, "suite": SUITE, "arch": "arm64", "python": GUEST_PYTHON}
        rootfs_reused = not force and _stamp_ok(base / "rootfs.json", root_want) and (base / "rootfs").is_dir()
        t = time.perf_counter()
        if rootfs_reused:
            say("      rootfs: cached")
        else:
            tmp = base / f"rootfs.building-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            (base / "rootfs.json").unlink(missing_ok=True)
            try:
                _debootstrap(tmp, mirror, say)
                shutil.rmtree(base / "rootfs", ignore_errors=True)
                shutil.rmtree(base / "views", ignore_errors=True)
                tmp.rename(base / "rootfs")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            (base / "rootfs.json").write_text(json.dumps({**root_want, "mirror": mirror, "built": time.time()}))
        steps["rootfs"] = time.perf_counter() - t

        say("[2/3] aarch64 runtime wheels (host pip, --platform manylinux aarch64, --only-binary=:all:)")
        reqs = stack_requirements()
        sites_reused: dict[str, bool] = {}
        for stack in stacks:
            t = time.perf_counter()
            want = {"recipe": RECIPE_VERSION, "requirements": reqs[stack], "python": GUEST_PYTHON,
                    "platforms": manylinux_platforms("aarch64", GLIBC)}
            stamp, site = base / "sites" / f"{stack}.json", base / "sites" / stack
            sites_reused[stack] = not force and _stamp_ok(stamp, want) and site.is_dir()
            if sites_reused[stack]:
                say(f"      {stack}: cached")
            else:
                tmp = base / "sites" / f"{stack}.building-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                stamp.unlink(missing_ok=True)
                try:
                    _pip_target(tmp, reqs[stack], say)
                    shutil.rmtree(site, ignore_errors=True)
                    tmp.rename(site)
                finally:
                    shutil.rmtree(tmp, ignore_errors=True)
                stamp.write_text(json.dumps({**want, "built": time.time()}))
            steps[f"wheels:{stack}"] = time.perf_counter() - t

        from .profile import get_profile

        prof = smoke_profile or get_profile("rpi4")
        say(f"[3/3] smoke test: importing the runtime with the arm64 Python under -cpu {prof.cpu.qemu_cpu}")
        t = time.perf_counter()
        root = EmulationRoot(base, qemu)
        versions = _smoke(root, prof)
        steps["smoke"] = time.perf_counter() - t
    return SetupResult(base, f"{qemu.version_str} ({qemu.path})", time.perf_counter() - t0, rootfs_reused,
                       sites_reused, _dir_bytes(base), versions, steps)
