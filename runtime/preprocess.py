"""Fundus preprocessing: the one implementation used by calibration, evaluation, training and the device.

Steps: decode (EXIF orientation; JPEG draft mode at the smallest DCT scale that still covers the network
input) -> find the circular field of view on a small proxy image -> crop a square around it -> resize ->
optional Ben Graham local-average subtraction -> normalise into a float32 tensor.

Every parameter lives in :class:`PreprocessSpec`, which is stored in the bundle manifest, so the device
reproduces exactly what was measured.
"""

from __future__ import annotations

import io
import math
import os
import struct
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from ..errors import ImageError, UsageError
from .decode_limits import ALLOWED_FORMATS, DecodeLimits, check_budget, read_image_file
from .dicom import is_dicom
from .fov import FieldOfView, detect_fov

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

ImageSource = str | os.PathLike[str] | bytes | Image.Image


@dataclass(frozen=True)
class PreprocessSpec:
    """Parameters of the preprocessing. Serialised into the bundle manifest as ``preprocessing``."""

    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    layout: str = "NCHW"
    resample: str = "bilinear"
    # Field of view: pixels brighter than this fraction of the 99th-percentile brightness count as retina.
    fov_threshold: float = 0.12
    # Draft decode must leave at least `size` pixels across a field of view this small relative to the
    # image's short side.
    fov_min_fraction: float = 0.6
    proxy_size: int = 160
    draft: bool = True
    # Ben Graham's local-average subtraction: Gaussian sigma as a fraction of `size`; None disables it.
    ben_graham_sigma: float | None = None
    max_pixels: int = 80_000_000
    min_side: int = 32

    def __post_init__(self) -> None:
        if not 16 <= self.size <= 4096:
            raise UsageError(f"preprocessing size must be 16..4096, got {self.size}")
        if self.layout not in ("NCHW", "NHWC"):
            raise UsageError(f"preprocessing layout must be NCHW or NHWC, got {self.layout!r}")
        if self.resample not in _RESAMPLE:
            raise UsageError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise UsageError("mean and std need three values each, std > 0")
        if not 0.0 < self.fov_threshold < 1.0:
            raise UsageError(f"fov_threshold must be in (0, 1), got {self.fov_threshold}")
        if not 0.1 <= self.fov_min_fraction <= 1.0:
            raise UsageError(f"fov_min_fraction must be in [0.1, 1], got {self.fov_min_fraction}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"unknown preprocessing fields {sorted(unknown)}; this kit knows {sorted(known)}")
        kw = dict(data)
        for key in ("mean", "std"):
            if key in kw:
                kw[key] = tuple(float(v) for v in kw[key])
        return cls(**kw)


@dataclass
class Preprocessed:
    """The result of preprocessing one image."""

    tensor: np.ndarray  # (1, 3, S, S) or (1, S, S, 3), float32
    image: Image.Image  # the square crop resized to S x S, RGB uint8 (for quality checks and previews)
    fov: FieldOfView
    original_size: tuple[int, int]
    decoded_size: tuple[int, int]
    timings_ms: dict[str, float] = field(default_factory=dict)
    # The same square crop at the quality check's own size (runtime/quality.py), when it was asked for: the
    # quality thresholds must not depend on the network's input size. It is `image` itself when the sizes match.
    quality_image: Image.Image | None = None
    transposed: bool = False  # the EXIF orientation swapped the axes of the stored picture

    @property
    def original_fov(self) -> FieldOfView:
        """The field of view in the ORIGINAL photograph's pixel coordinates: full resolution (the JPEG draft
        scale undone), EXIF orientation applied (the photo as a viewer shows it). ``fov`` itself is in the
        decoded (possibly draft-reduced) frame that the crops are cut from."""
        ow, oh = self.original_size
        if self.transposed:
            ow, oh = oh, ow
        dw, dh = self.decoded_size
        return self.fov.scaled(ow / dw, oh / dh)


# What Pillow raises on corrupt input besides OSError: Image.open itself treats these as "not this format"
# while probing, and decoders raise them on damaged streams. MemoryError: an image the device cannot hold.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError, struct.error,
                  ZeroDivisionError, Image.DecompressionBombError)


@contextmanager
def _pillow_guard() -> Iterator[None]:
    """Pillow's warnings about damaged metadata ("Corrupt EXIF data", "Truncated File Read", TIFF tag notes)
    are ignored, so a damaged file behaves the same whatever the warning filters of the host program (pytest
    turns warnings into errors); a decompression-bomb warning is an error, never a warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def decode(source: ImageSource, spec: PreprocessSpec, limits: DecodeLimits | None = None
           ) -> tuple[Image.Image, tuple[int, int]]:
    """Decode to an RGB image, EXIF-oriented, using JPEG draft mode when it loses nothing we need.

    Returns the image and the original (undrafted, un-rotated) size. Raises :class:`ImageError`, and only
    that, for any content of ``source``.
    """
    img, original, _ = _decode(source, spec, limits)
    return img, original


def _decode(source: ImageSource, spec: PreprocessSpec, limits: DecodeLimits | None = None
            ) -> tuple[Image.Image, tuple[int, int], bool]:
    """:func:`decode`, plus whether the EXIF orientation swapped the axes (a quarter turn or a transpose)."""
    transposed = False
    with _pillow_guard():
        if isinstance(source, Image.Image):
            opened = source
            original = opened.size
        else:
            opened, original = _open(source, spec, limits or DecodeLimits())
        try:
            img = ImageOps.exif_transpose(opened) or opened
            transposed = img.size != opened.size
            img = _to_rgb(img)
            img.load()
        except ImageError:
            raise
        except Image.DecompressionBombWarning as exc:
            raise ImageError("too-large", f"image refused as a possible decompression bomb: {exc}") from exc
        except MemoryError as exc:
            raise ImageError("too-large", "not enough memory to decode this image") from exc
        except _DECODE_ERRORS as exc:
            raise ImageError("decode-failed", f"cannot decode image: {exc}") from exc
        finally:
            if opened is not source:
                opened.close()  # decoded pixels live on in `img`; release the file handle either way
    if min(img.size) < spec.min_side:
        raise ImageError("too-small", f"image is {img.size[0]}x{img.size[1]}, smaller than {spec.min_side} px")
    return img, original, transposed


def _open(source: str | os.PathLike[str] | bytes, spec: PreprocessSpec, limits: DecodeLimits
          ) -> tuple[Image.Image, tuple[int, int]]:
    """Open (header only) by the rules of :mod:`.decode_limits`: a regular file within the size cap, an allowed
    format, a decoded size within the budget."""
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty-file", "the image data is empty")
        if len(source) > limits.max_file_bytes:
            raise ImageError("too-large", f"the image data has {len(source)} bytes, over the limit of "
                                          f"{limits.max_file_bytes}")
        data = source
    else:
        data = read_image_file(source, limits)  # a FIFO or a device is refused here, never read
        if not data:
            raise ImageError("empty-file", f"{source} is empty (0 bytes)")
    if is_dicom(data):
        return _open_dicom(data, spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("too-large", f"image refused as a possible decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not-an-image", "not a readable image file (JPEG, PNG, TIFF, BMP, WebP)") from exc
    except MemoryError as exc:
        raise ImageError("too-large", "not enough memory to open this image") from exc
    except _DECODE_ERRORS as exc:
        raise ImageError("decode-failed", f"cannot open image: {exc}") from exc
    try:
        w, h = img.size
        if w * h > spec.max_pixels:
            raise ImageError("too-large",
                             f"image is {w}x{h} = {w * h / 1e6:.0f} MP, over {spec.max_pixels / 1e6:.0f} MP")
        check_budget(img, data[:32], limits)
        if spec.draft and img.format == "JPEG" and img.mode in ("RGB", "L"):
            need = math.ceil(spec.size / spec.fov_min_fraction)
            img.draft(img.mode, (need, need))
    except ImageError:
        img.close()
        raise
    except _DECODE_ERRORS as exc:
        img.close()
        raise ImageError("decode-failed", f"cannot open image: {exc}") from exc
    return img, (w, h)


def _open_dicom(source: str | os.PathLike[str] | bytes, spec: PreprocessSpec) -> tuple[Image.Image, tuple[int, int]]:
    """Frame 0 of a DICOM photograph (``fundus-edge[dicom]``); a missing pydicom is this file's error, not the
    batch's."""
    from ..errors import MissingDependencyError
    from .dicom import decode_dicom

    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        img, _meta = decode_dicom(data, spec.max_pixels)
    except MissingDependencyError as exc:
        raise ImageError("decode-failed", f"a DICOM file: {exc}") from exc
    return img, img.size


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.clip(np.asarray(img, dtype=np.float64), 0.0, None)  # "I" is signed 32-bit
        top = max(float(arr.max()), 1.0)
        gray = Image.fromarray((arr * (255.0 / top)).astype(np.uint8), "L")
        return gray.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError("unsupported-mode", f"cannot convert pixel mode {img.mode!r} to RGB") from exc


def crop_resize(img: Image.Image, fov: FieldOfView, spec: PreprocessSpec) -> Image.Image:
    """Square crop around the field of view, resized to ``spec.size``; black where the square leaves the image.

    One resampling pass: only the part of the square inside the image is resized (with a sub-pixel box) and
    pasted onto a black canvas, so a circle cut at the top and bottom costs no padded full-size copy.
    """
    s = spec.size
    side = 2.0 * fov.radius
    x0, y0 = fov.cx - fov.radius, fov.cy - fov.radius
    w, h = img.size
    resample = _RESAMPLE[spec.resample]
    ix0, iy0, ix1, iy1 = max(0.0, x0), max(0.0, y0), min(float(w), x0 + side), min(float(h), y0 + side)
    if (ix0, iy0, ix1, iy1) == (x0, y0, x0 + side, y0 + side):
        return img.resize((s, s), resample, box=(x0, y0, x0 + side, y0 + side))
    scale = s / side
    dx0, dy0 = round((ix0 - x0) * scale), round((iy0 - y0) * scale)
    dw, dh = max(1, min(s - dx0, round((ix1 - ix0) * scale))), max(1, min(s - dy0, round((iy1 - iy0) * scale)))
    canvas = Image.new("RGB", (s, s))
    canvas.paste(img.resize((dw, dh), resample, box=(ix0, iy0, ix1, iy1)), (dx0, dy0))
    return canvas


def ben_graham(img: Image.Image, sigma_fraction: float) -> np.ndarray:
    """Local-average subtraction (Graham, Kaggle DR 2015): 4*I - 4*Gauss(I) + 128, outside the FOV set to 128."""
    size = img.size[0]
    blurred = np.asarray(img.filter(ImageFilter.GaussianBlur(radius=sigma_fraction * size)), dtype=np.float32)
    out = 4.0 * np.asarray(img, dtype=np.float32) - 4.0 * blurred + 128.0
    yy, xx = np.ogrid[:size, :size]
    c = (size - 1) / 2.0
    outside = (xx - c) ** 2 + (yy - c) ** 2 > (0.95 * size / 2.0) ** 2
    out[outside] = 128.0
    return np.clip(out, 0.0, 255.0)


def normalize(
    rgb: Image.Image | np.ndarray, spec: PreprocessSpec, out: np.ndarray | None = None
) -> np.ndarray:
    """(x / 255 - mean) / std in one fused pass, into ``out`` (allocated when None) of shape (1, ...)."""
    arr = np.asarray(rgb)
    scale = (1.0 / (255.0 * np.asarray(spec.std, dtype=np.float32))).astype(np.float32)
    bias = (-np.asarray(spec.mean, dtype=np.float32) / np.asarray(spec.std, dtype=np.float32)).astype(np.float32)
    s = spec.size
    if spec.layout == "NCHW":
        if out is None:
            out = np.empty((1, 3, s, s), dtype=np.float32)
        np.multiply(arr.transpose(2, 0, 1), scale[:, None, None], out=out[0], casting="unsafe")
        out[0] += bias[:, None, None]
    else:
        if out is None:
            out = np.empty((1, s, s, 3), dtype=np.float32)
        np.multiply(arr, scale, out=out[0], casting="unsafe")
        out[0] += bias
    return out


def relayout(tensors: np.ndarray, src: str, dst: str) -> np.ndarray:
    """A (N, ...) batch of preprocessed images from layout ``src`` to ``dst`` ("NCHW" / "NHWC"): same values."""
    for name in (src, dst):
        if name not in ("NCHW", "NHWC"):
            raise UsageError(f"layout must be NCHW or NHWC, got {name!r}")
    if src == dst:
        return tensors
    axes = (0, 2, 3, 1) if dst == "NHWC" else (0, 3, 1, 2)
    return np.ascontiguousarray(tensors.transpose(axes))


def preprocess(source: ImageSource, spec: PreprocessSpec, out: np.ndarray | None = None,
               quality_size: int | None = None, limits: DecodeLimits | None = None) -> Preprocessed:
    """Decode and preprocess one image into a model input. Raises :class:`ImageError` for bad images.

    ``quality_size``: also crop the decoded image to that size for the quality check (``quality_image``).
    """
    t0 = time.perf_counter()
    img, original, transposed = _decode(source, spec, limits)
    t1 = time.perf_counter()
    fov = detect_fov(img, spec)
    crop = crop_resize(img, fov, spec)
    pixels: Image.Image | np.ndarray = crop
    if spec.ben_graham_sigma:
        pixels = ben_graham(crop, spec.ben_graham_sigma)
    tensor = normalize(pixels, spec, out=out)
    t2 = time.perf_counter()
    timings = {"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3}
    quality_image: Image.Image | None = None
    if quality_size is not None:
        quality_image = crop if quality_size == spec.size else crop_resize(img, fov, replace(spec, size=quality_size))
        timings["quality_crop"] = (time.perf_counter() - t2) * 1e3
    return Preprocessed(
        tensor=tensor,
        image=crop,
        fov=fov,
        original_size=original,
        decoded_size=img.size,
        timings_ms=timings,
        quality_image=quality_image,
        transposed=transposed,
    )
