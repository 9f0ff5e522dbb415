"""Bounds on what one image may cost before it is decoded: file size, decoded memory, formats.

A 172 KB PNG can declare 8900x8900 16-bit RGB pixels: well under the megapixel limit, and 0.8 GB once Pillow has
decoded it and converted it to RGB, more than a Raspberry Pi 4 (1 GB variant) leaves a screener. So before any
pixel is decoded, the header's width x height x bands x bytes per sample (plus the 4-byte-per-pixel RGB working copy
every image is converted to) is checked against a budget, and the image is refused as ``too-large`` when it does
not fit. The budget is the device profile's (``--device``: half the memory the profile leaves the screener) or
:data:`DEFAULT_DECODE_MB`.

Only an allow-list of formats is ever decoded (:data:`ALLOWED_FORMATS`; DICOM goes through ``runtime/dicom``):
Pillow's other plugins (EPS and PostScript via Ghostscript, among others, which run external programs) are never
tried. Files are read through :mod:`.safe_io`: regular files only (a FIFO or ``/dev/zero`` is refused, not hung
on), at most ``max_file_bytes``. The same rules hold for ``screen`` with and without ``--store`` and for watch mode.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..errors import ImageError, UsageError
from .safe_io import UnsafeFileError, read_regular

MB = 1 << 20
DEFAULT_DECODE_MB = 1024
DEFAULT_FILE_MB = 256
# Pillow format names that may be decoded; everything else is "not-an-image"
ALLOWED_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP")
# bytes per pixel Pillow holds for an image of each mode (RGB is stored padded to 4 bytes)
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4, "LA": 4,
                 "PA": 4, "La": 4, "RGB": 4, "RGBA": 4, "RGBX": 4, "RGBa": 4, "CMYK": 4, "YCbCr": 4, "LAB": 4,
                 "HSV": 4}
_PNG_BANDS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel


@dataclass(frozen=True)
class DecodeLimits:
    """What decoding one image may cost. ``max_decoded_bytes``: 0 means no budget (the megapixel limit of the
    bundle's preprocessing spec still holds)."""

    max_decoded_bytes: int = DEFAULT_DECODE_MB * MB
    max_file_bytes: int = DEFAULT_FILE_MB * MB

    def __post_init__(self) -> None:
        if self.max_decoded_bytes < 0 or self.max_file_bytes <= 0:
            raise UsageError("decode limits must be positive (a decoded-memory budget of 0 disables it)")

    @classmethod
    def for_budget_mb(cls, budget_mb: int) -> DecodeLimits:
        """Limits for a device that leaves the screener ``budget_mb``: one decoded image may take half of it
        (the runtime, the model and its arena need the rest)."""
        return cls(max_decoded_bytes=max(64, budget_mb // 2) * MB)

    def to_dict(self) -> dict[str, Any]:
        return {"max_decoded_mb": self.max_decoded_bytes / MB, "max_file_mb": self.max_file_bytes / MB}


def read_image_file(path: str | os.PathLike[str], limits: DecodeLimits) -> bytes:
    """The bytes of an image file, by the rules above; :class:`ImageError` with a pinned code otherwise."""
    try:
        return read_regular(path, limits.max_file_bytes, follow_symlinks=True)
    except UnsafeFileError as exc:
        if exc.reason in ("missing", "unreadable"):
            raise ImageError("not-found", f"cannot read {exc.detail}") from exc
        if exc.reason == "too-large":
            raise ImageError("too-large", f"file {exc.detail}") from exc
        raise ImageError("not-an-image", f"{exc.detail}; only regular image files are read") from exc


def _file_bytes_per_pixel(head: bytes, mode: str, bands: int) -> float:
    """Bytes per pixel of the samples as the file declares them (PNG: its IHDR bit depth and colour type)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 26 and head[12:16] == b"IHDR":
        depth, colour = head[24], head[25]
        return _PNG_BANDS.get(colour, 4) * max(depth, 1) / 8
    per_sample = 2 if mode.startswith("I;16") else 4 if mode in ("I", "F") else 1
    return bands * per_sample


def decoded_bytes(size: tuple[int, int], mode: str, bands: int, head: bytes = b"") -> int:
    """Memory to decode an image of ``size``/``mode`` and convert it to RGB: the larger of the file's samples and
    Pillow's storage of the mode, plus the RGB copy (4 bytes per pixel)."""
    w, h = size
    own = max(_file_bytes_per_pixel(head, mode, bands), _STORED_BYTES.get(mode, 4))
    rgb = 0 if mode == "RGB" else 4
    return int(w * h * (own + rgb))


def check_budget(img: Any, head: bytes, limits: DecodeLimits) -> None:
    """Refuse (``too-large``) an opened, not yet decoded, Pillow image whose decoding would exceed the budget."""
    if img.format not in ALLOWED_FORMATS:
        raise ImageError("not-an-image", f"{img.format} images are not decoded here; use JPEG, PNG, TIFF, BMP, "
                                         "WebP or DICOM")
    if not limits.max_decoded_bytes:
        return
    need = decoded_bytes(img.size, img.mode, len(img.getbands()), head)
    if need > limits.max_decoded_bytes:
        w, h = img.size
        raise ImageError("too-large", f"image is {w}x{h} {img.mode} ({img.format}): decoding it takes "
                                      f"{need / MB:.0f} MB, over this device's budget of "
                                      f"{limits.max_decoded_bytes / MB:.0f} MB")

