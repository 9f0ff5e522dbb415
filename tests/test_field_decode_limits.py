"""Bounded decode: a decoded-memory budget from the header, regular files only, an allow-list of formats, the same
rules with and without a store."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from fundus_edge.errors import IMAGE_ERROR_CODES, UsageError
from fundus_edge.runtime.backends import BackendSettings
from fundus_edge.runtime.decode_limits import MB, DecodeLimits, decoded_bytes
from fundus_edge.runtime.preprocess import PreprocessSpec, decode


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def big_png(path: Path, side: int = 8900, depth: int = 16, colour: int = 2) -> Path:
    """A black ``side`` x ``side`` PNG (16-bit RGB by default), streamed: a few hundred KB on disk."""
    bands = {0: 1, 2: 3, 6: 4}[colour]
    row = b"\x00" + bytes((side * bands * depth + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, depth, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def test_decoded_size_comes_from_the_header() -> None:
    px = 8900 * 8900
    head16 = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + struct.pack(">IIBB", 8900, 8900, 16, 2)
    assert decoded_bytes((8900, 8900), "RGB", 3, head16) == px * (6 + 0)  # 16-bit samples, already RGB
    head1 = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + struct.pack(">IIBB", 8900, 8900, 1, 0)
    assert decoded_bytes((8900, 8900), "1", 1, head1) == px * (1 + 4)  # Pillow keeps a byte a pixel, then RGB
    assert decoded_bytes((100, 100), "I;16", 1) == 100 * 100 * (2 + 4)
    assert DecodeLimits.for_budget_mb(824).max_decoded_bytes == 412 * MB


def test_16bit_png_over_the_device_budget_is_refused_before_decoding(tmp_path: Path) -> None:
    png = big_png(tmp_path / "huge16.png")
    assert png.stat().st_size < 1 * MB
    spec = PreprocessSpec()
    with pytest.raises(Exception) as info:
        decode(str(png), spec, DecodeLimits.for_budget_mb(824))  # the Raspberry Pi 4 (1 GB) budget
    assert getattr(info.value, "code", None) == "too-large" and "budget" in str(info.value)
    # 1-bit and 16-bit grey PNGs, TIFF and WebP: measured from their headers as well
    for depth, colour in ((1, 0), (16, 0)):
        with pytest.raises(Exception) as info:
            decode(str(big_png(tmp_path / f"g{depth}.png", 6000, depth, colour)), spec,
                   DecodeLimits(max_decoded_bytes=64 * MB))
        assert getattr(info.value, "code", None) == "too-large"
    for fmt in ("TIFF", "WEBP"):
        buf = io.BytesIO()
        Image.new("RGB", (3000, 3000)).save(buf, fmt)
        with pytest.raises(Exception) as info:
            decode(buf.getvalue(), spec, DecodeLimits(max_decoded_bytes=16 * MB))
        assert getattr(info.value, "code", None) == "too-large", fmt


def test_formats_outside_the_allow_list_are_not_decoded(tmp_path: Path) -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 300 300\nshowpage\n"
    buf = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buf, "GIF")
    for data in (eps, buf.getvalue()):
        with pytest.raises(Exception) as info:
            decode(data, PreprocessSpec())
        assert getattr(info.value, "code", None) == "not-an-image"


def test_threads_are_bounded() -> None:
    with pytest.raises(UsageError, match="at most"):
        BackendSettings(threads=100_000)


@pytest.mark.parametrize("store", [False, True])
def test_fifo_and_dev_zero_are_refused_not_hung(built: Any, tmp_path: Path, real_photos: list[Path],
                                                store: bool) -> None:
    fifo = tmp_path / "camera.jpg"
    os.mkfifo(fifo)
    cmd = [sys.executable, "-m", "fundus_edge", "screen", "--bundle", str(built.out), str(fifo), "/dev/zero",
           str(real_photos[0]), "--json"] + (["--store", str(tmp_path / "r.db")] if store else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # a hang fails here
    assert proc.returncode == 10, proc.stderr
    results = {Path(r["source"]).name: r for r in json.loads(proc.stdout)["results"]}
    assert results["camera.jpg"]["error"]["code"] == "not-an-image"
    assert results["zero"]["error"]["code"] == "not-an-image"
    assert results[real_photos[0].name]["ok"]
    assert {r["error"]["code"] for r in results.values() if r.get("error")} <= set(IMAGE_ERROR_CODES)
