"""Fresh virtual environments holding only a device extra of fundus-edge, for the torch-free install tests."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def install_extra(env_dir: Path, extra: str) -> Path:
    """Create a venv at ``env_dir`` with ``fundus-edge[extra]`` (pinned by constraints.txt) and nothing else."""
    venv.create(env_dir, with_pip=True, clear=True)
    r = subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c",
         str(REPO / "constraints.txt"), f"{REPO}[{extra}]"],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, f"installing the {extra} extra failed:\n{r.stdout}\n{r.stderr}"
    return env_dir


def clean_env() -> dict[str, str]:
    """This environment without PYTHONPATH: the venv must run the fundus-edge it installed, not a checkout."""
    import os

    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run_cli(env_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The venv's own ``fundus-edge`` console script."""
    return subprocess.run([str(env_dir / "bin" / "fundus-edge"), *args], capture_output=True, text=True,
                          env=clean_env())


def build_wheel(dest: Path) -> Path:
    """The fundus-edge wheel as `make wheel` builds it, from a clean copy of the tree (no stale build/ inside)."""
    import shutil
    import sys

    src = dest / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv*", ".pp", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "demo-out", "out"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", "--wheel-dir", str(dest), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, f"building the wheel failed:\n{r.stdout}\n{r.stderr}"
    shutil.rmtree(src)
    wheels = sorted(dest.glob("fundus_edge-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def install_wheel_extra(env_dir: Path, wheel: Path, extra: str) -> Path:
    """Create a venv at ``env_dir`` with ``wheel[extra]`` (pinned by constraints.txt) and nothing else."""
    venv.create(env_dir, with_pip=True, clear=True)
    r = subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c",
         str(REPO / "constraints.txt"), f"{wheel}[{extra}]"],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, f"installing {wheel.name}[{extra}] failed:\n{r.stdout}\n{r.stderr}"
    return env_dir
