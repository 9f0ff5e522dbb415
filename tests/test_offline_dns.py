"""Nothing leaves the device: a running watch process and a batch `screen` make no DNS lookup and open no IP
socket, observed with strace inside an empty network namespace (so no packet can leave even if one were tried),
for longer than onnxruntime's telemetry takes to start (~10 s after start in 1.32). A positive control proves the
observer sees a lookup when one happens."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="strace and network namespaces are Linux-only")
IP_SOCKET = re.compile(r"(connect|sendto|sendmsg|sendmmsg)\(.*sa_family=AF_INET6?\b")


def _observed(argv: list[str], tmp: Path, seconds: float) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    """Run ``argv`` in a new network namespace under strace for at most ``seconds`` (then SIGTERM); return the
    IP-socket calls it made."""
    for tool in ("strace", "unshare"):
        assert shutil.which(tool), f"{tool} is needed for this test (apt-get install strace util-linux)"
    log = tmp / "strace.log"
    env = {**os.environ, "HOME": str(tmp / "home"), "XDG_CACHE_HOME": str(tmp / "cache")}
    for k in ("ORT_DISABLE_TELEMETRY", "ORT_TELEMETRY_DISABLED"):  # the kit must set these itself
        env.pop(k, None)
    cmd = ["timeout", "-s", "TERM", str(seconds), "unshare", "-n", "strace", "-f", "-qq", "-e",
           "trace=connect,sendto,sendmsg,sendmmsg", "-o", str(log), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=seconds + 60)
    calls = [line for line in log.read_text().splitlines() if IP_SOCKET.search(line)]
    return calls, proc


def test_observer_sees_a_dns_lookup(tmp_path: Path) -> None:
    code = "import socket\ntry:\n    socket.getaddrinfo('fundus-edge-dns-probe.invalid', 80)\nexcept OSError:\n    pass"
    calls, _ = _observed([sys.executable, "-c", code], tmp_path, 20)
    assert any("htons(53)" in c for c in calls), "the observer missed a DNS lookup: this test could not fail"


@pytest.mark.slow
def test_watch_and_screen_make_no_lookup(built: Any, real_photos: list[Path], tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for p in real_photos[:3]:
        shutil.copy(p, inbox / p.name)
    watch = [sys.executable, "-m", "fundus_edge", "screen", "--bundle", str(built.out), "--watch", str(inbox),
             "--store", str(tmp_path / "results.db"), "--poll", "0.5", "--settle", "0.5"]
    calls, proc = _observed(watch, tmp_path, 25)
    assert proc.returncode in (0, 124, 130, 143), proc.stderr[-2000:]
    assert "3 screened" in proc.stderr or proc.stdout.count("p(referable)") + proc.stdout.count("UNGRADABLE") == 3, (
        proc.stdout[-2000:], proc.stderr[-2000:])
    assert not calls, f"the watch process opened IP sockets (DNS or otherwise): {calls[:5]}"
    batch = [sys.executable, "-m", "fundus_edge", "screen", "--bundle", str(built.out), *map(str, real_photos)]
    calls, proc = _observed(batch, tmp_path, 40)
    assert proc.returncode in (0, 10), proc.stderr[-2000:]
    assert not calls, f"screen opened IP sockets: {calls[:5]}"
    cache = tmp_path / "cache"
    leftovers = [str(p) for p in cache.rglob("*")] if cache.exists() else []
    assert not [p for p in leftovers if "onnx" in p.lower() or "telemetry" in p.lower()], leftovers
