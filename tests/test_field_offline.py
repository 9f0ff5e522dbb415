"""Offline guarantee: build (signed) and screen with networking disabled in-process, and a running watcher
holds no socket at all (so nothing listens)."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from fundus_edge.cli import main
from fundus_edge.datasets.synthetic import write_dataset

_INET = (socket.AF_INET, socket.AF_INET6)


@contextmanager
def network_blocked() -> Iterator[list[str]]:
    """Every way in-process code reaches the network raises, and is recorded (so a swallowed attempt still
    shows). Unix sockets made from existing descriptors (socketpair) are left alone."""
    attempts: list[str] = []
    real_init = socket.socket.__init__

    def guarded_init(self: socket.socket, family: int = -1, type: int = -1, proto: int = -1,
                     fileno: int | None = None) -> None:
        if fileno is None and (family == -1 or family in _INET):
            attempts.append(f"socket(family={family})")
            raise OSError(errno.EACCES, "network disabled by the offline test")
        real_init(self, family, type, proto, fileno)

    def deny(name: str) -> Any:
        def blocked(*args: Any, **kwargs: Any) -> Any:
            attempts.append(f"{name}{args[1:2] if name.startswith('socket.') else args[:1]}")
            raise OSError(errno.EACCES, f"network disabled by the offline test ({name})")

        return blocked

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "__init__", guarded_init)
        for meth in ("connect", "connect_ex", "bind", "listen", "sendto"):
            mp.setattr(socket.socket, meth, deny(f"socket.{meth}"))
        for fn in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex"):
            mp.setattr(socket, fn, deny(fn))
        yield attempts


def test_the_guard_blocks_and_records() -> None:
    with network_blocked() as attempts:
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", 9), timeout=1)
        with pytest.raises(OSError):
            socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with pytest.raises((urllib.error.URLError, OSError)):
            urllib.request.urlopen("http://127.0.0.1:9/", timeout=1)
        a, b = socket.socketpair()  # local IPC is not networking
        a.close()
        b.close()
    assert len(attempts) >= 3
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # restored afterwards
    s.close()


@pytest.mark.slow
def test_build_sign_and_screen_offline(tmp_path: Path, real_photos: list[Path], capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUNDUS_EDGE_STATE_DIR", str(tmp_path / "state"))
    val = write_dataset(tmp_path / "val", 48, seed=12, size=256, cameras=("desktop", "handheld"))
    calib = write_dataset(tmp_path / "calib", 16, seed=11, size=256).parent
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for p in real_photos[:2]:
        (inbox / p.name).write_bytes(p.read_bytes())
    with network_blocked() as attempts:
        assert main(["keys", "generate", "--out", str(tmp_path / "keys"), "--name", "publisher", "--json"]) == 0
        kid = json.loads(capsys.readouterr().out)["key_id"]
        trusted = tmp_path / "trusted"
        trusted.mkdir()
        (trusted / "publisher.pub").write_bytes((tmp_path / "keys" / "publisher.pub").read_bytes())
        code = main(["build", "--model", "reference:dr-resnet18s", "--calib", str(calib), "--val", str(val),
                     "--out", str(tmp_path / "bundle"), "--n-boot", "50", "--max-flip-rate", "0.25",
                     "--min-delta-auc", "-0.2", "--min-delta-sensitivity", "-0.5",
                     # 48 images cannot show the specificity margin: the publisher signs a bundle whose manifest
                     # records INSUFFICIENT EVIDENCE, deliberately
                     "--allow-insufficient-evidence",
                     "--sign-key", str(tmp_path / "keys" / "publisher.key"), "--json"])
        build_out = capsys.readouterr()
        assert code == 0, build_out.err
        assert json.loads(build_out.out)["signed_by"] == kid and f"signed manifest.json with key {kid}" in build_out.err
        db = tmp_path / "r.db"
        code = main(["screen", "--bundle", str(tmp_path / "bundle"), "--trusted-keys", str(trusted),
                     "--require-signature", "--watch", str(inbox), "--store", str(db), "--settle", "0", "--poll",
                     "0.05", "--exit-when-idle", "--after", "mark", "--json"])
        screen_out = capsys.readouterr()
        assert code == 0, screen_out.err
        assert main(["results", "export", "--store", str(db), "--format", "jsonl"]) == 0
        rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert attempts == []  # nothing tried to reach the network, not even a name lookup
    assert len(rows) == 2 and all(r["ok"] and r["signature_key_id"] == kid for r in rows)
    from cryptography.hazmat.primitives import serialization

    key_file = tmp_path / "keys" / "publisher.key"
    raw = serialization.load_pem_private_key(key_file.read_bytes(), password=None).private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pem_body = [x for x in key_file.read_text().splitlines() if not x.startswith("-----")]
    for secret in [*pem_body, raw.hex(), "PRIVATE KEY"]:
        assert secret not in build_out.out + build_out.err + screen_out.out + screen_out.err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc (Linux)")
def test_a_running_watcher_holds_no_sockets(built: Any, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    log = tmp_path / "r.audit.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "fundus_edge", "screen", "--bundle", str(built.out), "--watch",
                             str(inbox), "--store", str(tmp_path / "r.db"), "--poll", "0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (log.exists() and "bundle-loaded" in log.read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, "the watcher did not start"
            time.sleep(0.05)
        fds = Path(f"/proc/{proc.pid}/fd")
        links = [os.readlink(fd) for fd in fds.iterdir()]
        assert links, "could not read the process's descriptors"
        sockets = [x for x in links if x.startswith("socket:")]
        assert sockets == []  # not listening, not connected, no socket of any kind
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    assert proc.returncode == 0
