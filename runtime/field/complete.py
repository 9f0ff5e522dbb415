"""Is a file in the watched folder complete? What its own structure says, per format watch mode accepts.

A camera or a copy tool may pause mid-write for longer than the settle window (a slow SD card, a network
share, a phone app saving an EXIF thumbnail first). So a file is taken only when its structure says it is
whole, read from the header and the end of the file, never by decoding:

- **JPEG**: the marker segments from the start are walked up to the first scan (an EXIF APP1 segment holding a
  thumbnail, which ends with its own ``FF D9``, is skipped by its length), and the file must end with ``FF D9``
  after that scan (trailing zero padding allowed). A file paused right after the thumbnail's end marker is
  incomplete: its APP1 segment runs past the end of the file, or no scan follows it.
- **PNG**: ends with the ``IEND`` chunk.
- **WebP**: the RIFF header's size covers the file (``size + 8 <= file size``).
- **BMP**: the header's file size (or, when a writer left it 0, pixel offset + rows x stride) is there.
- **TIFF**: every IFD in the chain, and every strip and tile it points to, lies inside the file.
- **DICOM** and anything else: cannot tell (``None``); watch mode then relies on the settle window, the grace
  period, and on retrying a file that failed to decode while it was young (runtime/field/watch.py).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO

_TAIL = 64
_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
_PNG_SIG, _PNG_IEND = b"\x89PNG\r\n\x1a\n", b"IEND\xaeB`\x82"
_MAX_IFDS = 64
_MAX_ENTRIES = 4096
_MAX_STRIPS = 1 << 20
_TIFF_TYPES = {3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}  # SHORT, LONG, LONG8 (BigTIFF)
_OFFSET_TAGS = {273: 279, 324: 325}  # StripOffsets -> StripByteCounts, TileOffsets -> TileByteCounts


def completeness(path: Path) -> bool | None:
    """True: the file is whole by its format's structure; False: it is not (still being written, or cut);
    None: its format gives no way to tell. An unreadable file counts as whole (screening records why)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
            size = fh.seek(0, os.SEEK_END)
            return _check(fh, head, size)
    except OSError:
        return True


def _check(fh: BinaryIO, head: bytes, size: int) -> bool | None:
    f = fh
    if head.startswith(_JPEG_SOI):
        return _jpeg(f, size)
    if head.startswith(_PNG_SIG):
        return _tail(f, size).endswith(_PNG_IEND)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return len(head) >= 8 and struct.unpack("<I", head[4:8])[0] + 8 <= size
    if head[:2] == b"BM" and len(head) >= 30:
        return _bmp(head, size)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _tiff(f, head, size)
    return None


def _tail(f: BinaryIO, size: int) -> bytes:
    f.seek(max(0, size - _TAIL))
    return f.read().rstrip(b"\x00")  # some cameras pad after the end marker


def _jpeg(f: BinaryIO, size: int) -> bool:
    """Walk the marker segments to the first scan (SOS), then require the end marker at the end."""
    pos = 2
    while True:
        f.seek(pos)
        marker = f.read(4)
        if len(marker) < 4 or marker[0] != 0xFF:
            return False  # cut inside the headers (or damaged: the decoder will say so after the grace period)
        kind = marker[1]
        if kind == 0xFF:  # fill byte
            pos += 1
            continue
        if kind in (0xD8, 0x01) or 0xD0 <= kind <= 0xD7:  # markers without a length
            pos += 2
            continue
        if kind == 0xD9:  # an end marker before any scan
            return False
        length = struct.unpack(">H", marker[2:4])[0]
        end = pos + 2 + length
        if end > size:
            return False  # a segment (e.g. the EXIF thumbnail's APP1) runs past the end of the file
        if kind == 0xDA:  # start of scan: the image data follows, up to the end marker
            return size > end and _tail(f, size).endswith(_JPEG_EOI)
        pos = end


def _bmp(head: bytes, size: int) -> bool:
    declared = struct.unpack("<I", head[2:6])[0]
    if declared:
        return size >= declared
    offset, width, height, bpp = struct.unpack("<IiiH", head[10:14] + head[18:26] + head[28:30])
    stride = ((abs(width) * bpp + 31) // 32) * 4
    return size >= offset + stride * abs(height)


def _tiff(f: BinaryIO, head: bytes, size: int) -> bool:
    """Every IFD, and every strip/tile it points to, inside the file."""
    e = "<" if head[:2] == b"II" else ">"
    big = head[2:4] in (b"+\x00", b"\x00+")
    off_fmt, count_fmt, entry_size, first = ("Q", "Q", 20, 8) if big else ("I", "H", 12, 4)
    ifd = struct.unpack(e + off_fmt, head[first:first + struct.calcsize(off_fmt)])[0]
    seen: set[int] = set()
    while ifd:
        if ifd in seen or len(seen) >= _MAX_IFDS:
            return True  # a loop or an absurd chain: let the decoder judge it
        seen.add(ifd)
        n_size = struct.calcsize(count_fmt)
        raw = _read_at(f, ifd, n_size)
        if len(raw) < n_size:
            return False
        n = min(struct.unpack(e + count_fmt, raw)[0], _MAX_ENTRIES)
        table = _read_at(f, ifd + n_size, n * entry_size + struct.calcsize(off_fmt))
        if len(table) < n * entry_size + struct.calcsize(off_fmt):
            return False
        values = {}
        for i in range(n):
            entry = table[i * entry_size:(i + 1) * entry_size]
            tag, kind = struct.unpack(e + "HH", entry[:4])
            if tag in _OFFSET_TAGS or tag in _OFFSET_TAGS.values():
                values[tag] = _tiff_values(f, e, entry, kind, big, size)
                if values[tag] is None:
                    return False
        for off_tag, count_tag in _OFFSET_TAGS.items():
            offsets, counts = values.get(off_tag) or [], values.get(count_tag) or []
            if any(o + c > size for o, c in zip(offsets, counts, strict=False)):
                return False
        ifd = struct.unpack(e + off_fmt, table[n * entry_size:])[0]
    return True


def _tiff_values(f: BinaryIO, e: str, entry: bytes, kind: int, big: bool, size: int) -> list[int] | None:
    """The SHORT/LONG values of one IFD entry (inline or at their offset); None when they lie past the end."""
    if kind not in _TIFF_TYPES:
        return []
    code, width = _TIFF_TYPES[kind]
    count = struct.unpack(e + ("Q" if big else "I"), entry[4:12] if big else entry[4:8])[0]
    count = min(count, _MAX_STRIPS)
    inline = entry[12:20] if big else entry[8:12]
    if count * width <= len(inline):
        data = inline[:count * width]
    else:
        at = struct.unpack(e + ("Q" if big else "I"), inline)[0]
        if at + count * width > size:
            return None
        data = _read_at(f, at, count * width)
    return list(struct.unpack(e + code * count, data)) if len(data) == count * width else None


def _read_at(f: BinaryIO, pos: int, n: int) -> bytes:
    f.seek(pos)
    return f.read(n)
