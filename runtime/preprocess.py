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


@dataclass(frozen=True)
class FieldOfView:
    """The detected circular field of view, in the decoded image's pixel coordinates."""

    cx: float
    cy: float
    radius: float
    found: bool
    coverage: float  # fraction of the decoded image that is retina
    clipped: bool  # the circle runs past the image edge (common: top/bottom cut)
    # "circle", "frame-inside-fov" (lit to the frame's edges: the circle is the frame's circumscribed one), or
    # why no field of view was found (found=False)
    reason: str = "circle"

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def scaled(self, sx: float, sy: float) -> FieldOfView:
        """The same circle in coordinates scaled by (sx, sy) (e.g. from the draft-decoded frame to the photo's)."""
        return replace(self, cx=self.cx * sx, cy=self.cy * sy, radius=self.radius * math.sqrt(sx * sy))


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


def decode(source: ImageSource, spec: PreprocessSpec) -> tuple[Image.Image, tuple[int, int]]:
    """Decode to an RGB image, EXIF-oriented, using JPEG draft mode when it loses nothing we need.

    Returns the image and the original (undrafted, un-rotated) size. Raises :class:`ImageError`, and only
    that, for any content of ``source``.
    """
    img, original, _ = _decode(source, spec)
    return img, original


def _decode(source: ImageSource, spec: PreprocessSpec) -> tuple[Image.Image, tuple[int, int], bool]:
    """:func:`decode`, plus whether the EXIF orientation swapped the axes (a quarter turn or a transpose)."""
    transposed = False
    with _pillow_guard():
        if isinstance(source, Image.Image):
            opened = source
            original = opened.size
        else:
            opened, original = _open(source, spec)
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


def _open(source: str | os.PathLike[str] | bytes, spec: PreprocessSpec) -> tuple[Image.Image, tuple[int, int]]:
    if isinstance(source, bytes):
        if not source:
            raise ImageError("empty-file", "the image data is empty")
        fp: Any = io.BytesIO(source)
    else:
        path = Path(source)
        try:
            if path.stat().st_size == 0:
                raise ImageError("empty-file", f"{path} is empty (0 bytes)")
        except OSError as exc:
            raise ImageError("not-found", f"cannot read {path}: {exc.strerror or exc}") from exc
        fp = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp)
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


# Field-of-view detection: a robust threshold between the surround's and the retina's level, the outermost lit
# pixel of every row and column (interior shadows do not move it), sub-pixel crossings, and a RANSAC circle fit
# that ignores marks in the surround and boundary points on the frame's edge (a circle cut by the frame).
_FOV_RANSAC = 96  # candidate circles (vectorised; deterministic seed)
_FOV_MIN_INLIERS = 0.5  # share of boundary points the circle must explain
_FOV_MIN_LEVEL = 8.0  # grey levels: a frame whose bright pixels are darker than this has nothing to find
# No dark surround in the frame (all retina, or not a fundus): its darkest 2 % are above this fraction of the 95th
# percentile and above _FOV_BLACK grey levels (a fundus camera's surround is black, however dim the retina).
_FOV_NO_SURROUND = 0.2
_FOV_BLACK = 12.0


def _boundary_points(v: np.ndarray, thr: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Outermost above-threshold pixel of each row and column, as sub-pixel crossings (x, y) in proxy pixels;
    points on the frame's edge are dropped. Also returns the share of the frame's edge pixels that are lit."""
    lit = v > thr
    edge_lit = float(np.r_[lit[0], lit[-1], lit[:, 0], lit[:, -1]].mean())
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for arr, flip in ((v, False), (v.T, True)):
        m = arr > thr
        n = arr.shape[1]
        any_ = m.any(axis=1)
        first = np.argmax(m, axis=1)
        last = n - 1 - np.argmax(m[:, ::-1], axis=1)
        rows = np.arange(arr.shape[0])
        for idx, step in ((first, -1), (last, 1)):
            ok = any_ & (idx > 0) & (idx < n - 1)
            r, i = rows[ok], idx[ok]
            inside, outside = arr[r, i], arr[r, i + step]
            frac = np.clip((inside - thr) / np.maximum(inside - outside, 1e-3), 0.0, 1.0)
            pos = i + 0.5 + step * frac  # pixel centres at i + 0.5; the crossing lies toward the outside
            px, py = (r + 0.5, pos) if flip else (pos, r + 0.5)
            xs.append(np.asarray(px, np.float64))
            ys.append(np.asarray(py, np.float64))
    return np.concatenate(xs), np.concatenate(ys), edge_lit


def _fit_circle(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Algebraic least-squares circle (Kasa) through the points."""
    a = np.c_[x, y, np.ones_like(x)]
    sol = np.linalg.lstsq(a, x * x + y * y, rcond=None)[0]
    cx, cy = 0.5 * float(sol[0]), 0.5 * float(sol[1])
    return cx, cy, math.sqrt(max(float(sol[2]) + cx * cx + cy * cy, 0.0))


def _ransac_circle(x: np.ndarray, y: np.ndarray, tol: float) -> tuple[float, float, float, np.ndarray]:
    """The circle through three boundary points that explains most of them (within ``tol``), refitted on its
    inliers. Deterministic."""
    rng = np.random.default_rng(0)
    n = x.size
    idx = rng.integers(0, n, size=(_FOV_RANSAC, 3))
    x1, x2, x3 = x[idx[:, 0]], x[idx[:, 1]], x[idx[:, 2]]
    y1, y2, y3 = y[idx[:, 0]], y[idx[:, 1]], y[idx[:, 2]]
    d = 2.0 * (x1 * (y2 - y3) + x2 * (y3 - y1) + x3 * (y1 - y2))
    ok = np.abs(d) > 1e-6
    d = np.where(ok, d, 1.0)
    s1, s2, s3 = x1 * x1 + y1 * y1, x2 * x2 + y2 * y2, x3 * x3 + y3 * y3
    cx = (s1 * (y2 - y3) + s2 * (y3 - y1) + s3 * (y1 - y2)) / d
    cy = (s1 * (x3 - x2) + s2 * (x1 - x3) + s3 * (x2 - x1)) / d
    r = np.hypot(x1 - cx, y1 - cy)
    resid = np.abs(np.hypot(x[None, :] - cx[:, None], y[None, :] - cy[:, None]) - r[:, None])
    votes = np.where(ok, (resid <= tol).sum(axis=1), -1)
    inl = resid[int(np.argmax(votes))] <= tol
    for _ in range(2):  # refit on the inliers, then re-select them around the refined circle
        fcx, fcy, fr = _fit_circle(x[inl], y[inl])
        inl = np.abs(np.hypot(x - fcx, y - fcy) - fr) <= tol
        if inl.sum() < 3:
            break
    return fcx, fcy, fr, inl


def detect_fov(img: Image.Image, spec: PreprocessSpec) -> FieldOfView:
    """Find the circular field of view on a small proxy of ``img`` (RGB), in ``img``'s pixel coordinates.

    Threshold: ``fov_threshold`` of the way from the surround's level (2nd percentile) to the retina's (95th),
    so an under-exposed frame gets a proportionally lower threshold. Boundary: the outermost lit pixel of each
    row and column (a dark or shadowed centre does not move it), at sub-pixel precision; points on the frame's
    edge are left out (circles cut at the top and bottom). Circle: RANSAC, so burnt-in text and notches in the
    surround are outliers. Outcomes (``FieldOfView.reason``): ``circle``; ``frame-inside-fov`` when the frame
    is lit to its edges all round (a camera that crops inside the field of view: the circle is then the
    frame's circumscribed circle, the smallest one consistent with the picture); otherwise ``found=False``
    with the reason and the centred fallback circle.
    """
    w, h = img.size
    factor = max(1, max(w, h) // spec.proxy_size)
    proxy = img.reduce(factor) if factor > 1 else img
    v = np.asarray(proxy, dtype=np.float32).max(axis=2)
    ph, pw = v.shape
    sx = sy = float(factor)  # proxy pixel i covers pixels [i * factor, (i + 1) * factor) of img
    lo, hi = (float(q) for q in np.percentile(v, (2, 95)))
    if hi < _FOV_MIN_LEVEL:
        return _fallback_fov(w, h, 0.0, "too dark: no lit field of view")
    if lo > max(_FOV_NO_SURROUND * hi, _FOV_BLACK):  # not even 2 % of the frame is black: no surround
        return _frame_inside(w, h, 1.0)
    thr = lo + max(spec.fov_threshold * (hi - lo), 3.0)
    coverage = float((v > thr).mean())
    x, y, edge_lit = _boundary_points(v, thr)
    # Lit to the edges nearly all round (at most dark corners): the frame lies inside the field of view.
    inside = coverage >= 0.85 and edge_lit >= 0.8
    if edge_lit >= 0.97 or x.size < 12:
        return _frame_inside(w, h, coverage) if inside else _fallback_fov(w, h, coverage, "no field-of-view boundary")
    if coverage < 0.05:
        return _fallback_fov(w, h, coverage, "lit area too small")
    cx, cy, r, inl = _ransac_circle(x, y, tol=max(1.0, 0.01 * max(pw, ph)))
    n_in = int(inl.sum())
    if n_in < max(12, _FOV_MIN_INLIERS * x.size) or not 0.15 * min(pw, ph) <= r <= 0.8 * math.hypot(pw, ph):
        return _frame_inside(w, h, coverage) if inside else _fallback_fov(w, h, coverage, "no circular boundary")
    if not (-0.25 * pw <= cx <= 1.25 * pw and -0.25 * ph <= cy <= 1.25 * ph):
        return _fallback_fov(w, h, coverage, "circle centre outside the frame")
    clipped = cx - r < -0.5 or cx + r > pw + 0.5 or cy - r < -0.5 or cy + r > ph + 0.5
    return FieldOfView(cx=cx * sx, cy=cy * sy, radius=r * sx, found=True, coverage=coverage,
                       clipped=bool(clipped))


def _frame_inside(w: int, h: int, coverage: float) -> FieldOfView:
    """The frame lies inside the field of view: the smallest circle consistent with it, its circumscribed one."""
    return FieldOfView(cx=w / 2.0, cy=h / 2.0, radius=0.5 * math.hypot(w, h), found=True, coverage=coverage,
                       clipped=True, reason="frame-inside-fov")


def _fallback_fov(w: int, h: int, coverage: float, reason: str) -> FieldOfView:
    return FieldOfView(cx=w / 2.0, cy=h / 2.0, radius=min(w, h) / 2.0, found=False, coverage=coverage, clipped=False,
                       reason=reason)


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
               quality_size: int | None = None) -> Preprocessed:
    """Decode and preprocess one image into a model input. Raises :class:`ImageError` for bad images.

    ``quality_size``: also crop the decoded image to that size for the quality check (``quality_image``).
    """
    t0 = time.perf_counter()
    img, original, transposed = _decode(source, spec)
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
