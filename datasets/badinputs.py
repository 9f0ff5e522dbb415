"""Bad inputs for hardening tests: a named corpus of the kinds of files a camera app or a user drops on the
device, with the outcome each must get, and a byte mutator for fuzzing (driven by hypothesis in the tests
and the benchmark).

Everything is generated here (numpy + Pillow + hand-written headers); nothing is downloaded. The
"decompression bombs" are headers that claim a huge image: Pillow decides at open time, so no test ever
needs the gigabytes the header asks for.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .synthetic import generate

OK = "ok"
UNGRADABLE = "ungradable"


@dataclass(frozen=True)
class BadInput:
    name: str  # file name, extension included (the extension is part of the case: "wrong extension")
    data: bytes
    expect: str  # "ok" (screened, whatever the decision), "ungradable" (the quality gate's decision), or the code
    what: str


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_header_claiming(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose IHDR claims ``width x height`` grey pixels, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """``data`` (a JPEG) with the frame header (SOF0/SOF2) patched to claim ``width x height``."""
    buf = bytearray(data)
    i = 2
    while i + 9 < len(buf):
        if buf[i] != 0xFF:
            break
        marker = buf[i + 1]
        length = struct.unpack(">H", bytes(buf[i + 2:i + 4]))[0]
        if marker in (0xC0, 0xC1, 0xC2):
            buf[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(buf)
        i += 2 + length
    raise ValueError("no SOF marker found")


def fundus_jpeg(seed: int = 3, size: int = 320, **kw: object) -> bytes:
    return _encode(generate(seed, size=size).image, "JPEG", quality=90, **kw)


def corpus() -> list[BadInput]:
    """One file per kind of bad (or merely unusual) input named in issue 7, with the outcome it must get."""
    base = generate(3, size=320).image
    jpg = _encode(base, "JPEG", quality=90)
    png = _encode(base, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    cases = [
        BadInput("empty.jpg", b"", "empty-file", "zero-byte file"),
        BadInput("truncated.jpg", jpg[: len(jpg) // 2], "decode-failed", "JPEG cut in half"),
        BadInput("truncated-header.jpg", jpg[:40], "decode-failed", "JPEG cut inside its headers"),
        BadInput("truncated.png", png[: len(png) // 2], "decode-failed", "PNG cut in half"),
        BadInput("corrupt-crc.png", png[:60] + bytes([png[60] ^ 0xFF]) + png[61:], "decode-failed",
                 "PNG with a damaged chunk (CRC mismatch)"),
        BadInput("corrupt-scan.jpg", jpg[:200] + b"\xff\xd9" + bytes(range(256)) * 4, "decode-failed",
                 "JPEG whose entropy-coded data is replaced by junk"),
        BadInput("png-named.jpg", png, OK, "a PNG with a .jpg extension (content decides, not the name)"),
        BadInput("notes.jpg", b"patient notes, not a picture\n" * 10, "not-an-image", "text file named .jpg"),
        BadInput("report.png", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n" * 4, "not-an-image",
                 "PDF named .png"),
        BadInput("archive.jpg", b"PK\x03\x04" + bytes(200), "not-an-image", "zip archive named .jpg"),
        BadInput("bomb-900mp.png", png_header_claiming(30000, 30000), "too-large",
                 "decompression bomb: PNG header claiming 900 megapixels (Pillow's error threshold)"),
        BadInput("bomb-100mp.png", png_header_claiming(10000, 10000), "too-large",
                 "PNG header claiming 100 megapixels (Pillow's warning zone: an error here, never a warning)"),
        BadInput("huge-81mp.png", png_header_claiming(9000, 9000), "too-large",
                 "81 megapixels: over the runtime's own 80 MP limit"),
        BadInput("huge-dims.jpg", jpeg_with_size(jpg, 65500, 65500), "too-large",
                 "JPEG whose frame header claims 65500 x 65500"),
        BadInput("cmyk.jpg", _encode(base.convert("CMYK"), "JPEG", quality=90), OK, "CMYK JPEG"),
        BadInput("grey16.png", _encode(Image.fromarray(
            (np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)), "PNG"), OK, "16-bit PNG"),
        BadInput("palette.png", _encode(base.convert("P"), "PNG"), OK, "palette PNG"),
        BadInput("alpha.png", _encode(base.convert("RGBA"), "PNG"), OK, "PNG with an alpha channel"),
        BadInput("grey.jpg", _encode(base.convert("L"), "JPEG", quality=90), OK, "greyscale JPEG"),
        BadInput("exif-rotated.jpg", _encode(base.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=90,
                                             exif=exif.tobytes()), OK, "EXIF orientation 6"),
        BadInput("tiny.png", _encode(base.resize((8, 8)), "PNG"), "too-small", "8 x 8 pixels"),
        BadInput("strip.png", _encode(Image.new("RGB", (32, 16000), (180, 80, 40)), "PNG"), OK,
                 "32 x 16000 strip (extreme aspect ratio: its square crop would be 256 megapixels)"),
        BadInput("not-fundus.jpg", _encode(_not_fundus(), "JPEG", quality=90), UNGRADABLE,
                 "a photograph that is not a fundus image: the quality gate's 'ungradable', with its reasons"),
        BadInput("black.png", _encode(Image.new("RGB", (400, 300)), "PNG"), UNGRADABLE, "an all-black frame"),
    ]
    return cases


def _not_fundus() -> Image.Image:
    """A daylight 'scene': sky gradient, ground, a few shapes. No black border, no retina."""
    h, w = 300, 400
    y = np.linspace(0.0, 1.0, h)[:, None, None]
    sky = np.array([120, 170, 235], dtype=np.float64) * (1 - y) + np.array([200, 220, 250]) * y
    img = np.broadcast_to(sky, (h, w, 3)).copy()
    img[200:] = np.array([70, 130, 60])
    img[120:200, 60:140] = np.array([150, 40, 40])
    return Image.fromarray(img.astype(np.uint8), "RGB")


def write_corpus(out_dir: str | Path) -> dict[str, BadInput]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    items = corpus()
    for item in items:
        (out / item.name).write_bytes(item.data)
    return {item.name: item for item in items}


# ------------------------------------------------------------------------------------------------ fuzzing
def fuzz_seeds(real_photos: Sequence[Path] = (), size: int = 256) -> list[tuple[str, bytes]]:
    """Valid files to mutate: synthetic fundus images in every format and pixel mode the runtime reads,
    plus real photographs (as they are, and re-encoded small for speed)."""
    img = generate(5, size=size).image
    exif = Image.Exif()
    exif[0x0112] = 8
    seeds = [
        ("jpeg", _encode(img, "JPEG", quality=90)),
        ("jpeg-progressive", _encode(img, "JPEG", quality=85, progressive=True)),
        ("jpeg-exif", _encode(img, "JPEG", quality=90, exif=exif.tobytes())),
        ("jpeg-grey", _encode(img.convert("L"), "JPEG", quality=90)),
        ("jpeg-cmyk", _encode(img.convert("CMYK"), "JPEG", quality=90)),
        ("png", _encode(img, "PNG")),
        ("png-palette", _encode(img.convert("P"), "PNG")),
        ("png-alpha", _encode(img.convert("RGBA"), "PNG")),
        ("png-16bit", _encode(Image.fromarray((np.asarray(img.convert("L"), np.uint16) * 257).astype(np.uint16)),
                              "PNG")),
        ("tiff", _encode(img, "TIFF")),
        ("bmp", _encode(img, "BMP")),
        ("webp", _encode(img, "WEBP", quality=80)),
        ("gif", _encode(img.convert("P"), "GIF")),
    ]
    for p in real_photos:
        data = Path(p).read_bytes()
        seeds.append((f"real:{Path(p).name}", data))
        with Image.open(io.BytesIO(data)) as real:
            small = real.convert("RGB")
            small.thumbnail((size, size))
            seeds.append((f"real-small:{Path(p).name}", _encode(small, "JPEG", quality=88)))
    return seeds


_MAGIC = (b"\xff\xff", b"\x00\x00", b"\x7f\xff", b"\x80\x00", b"\xff\xd9", b"\xff\xd8", b"\xff\xc0", b"\x00\x01")
N_OPS = 9


def mutate(data: bytes, ops: Sequence[tuple[int, int, int]]) -> bytes:
    """Apply mutation ops ``(kind, position, value)`` in order. Positions wrap around the current length, so
    any integers make a valid op list (convenient for hypothesis). Kinds: 0 set byte, 1 flip bit, 2 truncate,
    3 insert bytes, 4 delete a range, 5 duplicate a range, 6 write a 2-byte magic value, 7 patch the image's
    claimed size (JPEG SOF / PNG IHDR) to a big or zero value, 8 splice in a chunk of another position."""
    buf = bytearray(data)
    for kind, pos, value in ops:
        n = len(buf)
        if n == 0:
            buf.extend(bytes([value & 0xFF]))
            continue
        i = pos % n
        k = kind % N_OPS
        if k == 0:
            buf[i] = value & 0xFF
        elif k == 1:
            buf[i] ^= 1 << (value % 8)
        elif k == 2:
            del buf[i:]
        elif k == 3:
            buf[i:i] = bytes((value * 31 + j * 17) & 0xFF for j in range(1 + value % 32))
        elif k == 4:
            del buf[i:i + 1 + value % 512]
        elif k == 5:
            buf[i:i] = buf[i:i + 1 + value % 256]
        elif k == 6:
            buf[i:i + 2] = _MAGIC[value % len(_MAGIC)]
        elif k == 7:
            _patch_size(buf, value)
        else:
            j = value % n
            buf[i:i + 16] = buf[j:j + 16]
    return bytes(buf)


def _patch_size(buf: bytearray, value: int) -> None:
    dims = (0, 1, 65535, 30000, 12000, 9000, 256)
    w, h = dims[value % len(dims)], dims[(value // 7) % len(dims)]
    if buf[:8] == b"\x89PNG\r\n\x1a\n" and len(buf) >= 24:
        buf[16:24] = struct.pack(">II", w, h)
        return
    i = 2
    while i + 9 < len(buf) and buf[i] == 0xFF:
        marker = buf[i + 1]
        length = struct.unpack(">H", bytes(buf[i + 2:i + 4]))[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            buf[i + 5:i + 9] = struct.pack(">HH", h, w)
            return
        i += 2 + max(length, 2)
