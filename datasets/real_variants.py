"""Variants of REAL fundus photographs for checking the quality gate and the field-of-view detector.

The open-fundus photographs (IDRiD, HRF, CHASE_DB1; see ``datasets/open_fundus.py``) are all gradable and
come from three cameras that put the circular field of view on a black surround. Cameras differ, and so do
eyes; these functions make the variants the kit must still handle (or still refuse):

- :func:`inscribed_crop`: the square inscribed in the field of view, as a camera that crops *inside* the
  field of view (no black surround) would deliver it. Gradable.
- :func:`pigmented`: a darker, browner fundus (fundus pigmentation varies by population). Brightness x ``k``
  and the chromaticity blended by ``t`` toward a brown-grey (R:G:B = 1.25:0.95:0.70 at equal luma). The
  supported range is :data:`PIGMENT_RANGE` (k 0.6-1.0, t 0-0.5). Gradable.
- :func:`underexposed` (x0.3) and :func:`central_shadow`: dark frames for the field-of-view detector (the
  circle must still be found, or reported as not found).
- :func:`blurred_dark`: a blurred and darkened copy. Ungradable.

Numpy + Pillow, deterministic.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageFilter

# Supported pigmentation range: brightness factor k and brown shift t (see :func:`pigmented`).
PIGMENT_RANGE = {"k": (0.6, 1.0), "t": (0.0, 0.5)}
_BROWN = np.array([1.25, 0.95, 0.70], np.float32)
_BROWN /= float(_BROWN @ np.array([0.299, 0.587, 0.114], np.float32))  # unit luma


def _img(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def inscribed_crop(img: Image.Image, cx: float, cy: float, radius: float) -> Image.Image:
    """The square inscribed in the circle (cx, cy, radius), clipped to the image (pixel coordinates of ``img``)."""
    half = radius / math.sqrt(2.0)
    w, h = img.size
    box = (max(0, round(cx - half)), max(0, round(cy - half)), min(w, round(cx + half)), min(h, round(cy + half)))
    return img.convert("RGB").crop(box)


def pigmented(img: Image.Image, k: float, t: float) -> Image.Image:
    """Darker (x ``k``) and browner (chromaticity blended by ``t`` toward a brown-grey of the same luma)."""
    a = np.asarray(img.convert("RGB"), np.float32)
    luma = a @ np.array([0.299, 0.587, 0.114], np.float32)
    out = (1.0 - t) * a + t * luma[:, :, None] * _BROWN
    return _img(out * k)


def underexposed(img: Image.Image, k: float = 0.3) -> Image.Image:
    """The whole frame at ``k`` of its exposure (no added noise: JPEG re-encoding adds its own)."""
    return _img(np.asarray(img.convert("RGB"), np.float32) * k)


def central_shadow(img: Image.Image, cx: float, cy: float, radius: float, depth: float = 0.85,
                   extent: float = 0.55) -> Image.Image:
    """A dark shadow over the centre of the field of view: brightness x (1 - depth) at the centre, fading by
    ``extent`` x radius (a small pupil's or a cataract's shadow)."""
    a = np.asarray(img.convert("RGB"), np.float32)
    h, w = a.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    d2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / (extent * radius) ** 2
    shade = 1.0 - depth * np.exp(-d2)
    return _img(a * shade[:, :, None])


def blurred_dark(img: Image.Image, sigma: float = 0.012, k: float = 0.5) -> Image.Image:
    """Gaussian blur (sigma ``sigma`` x the short side) and brightness x ``k``: not gradable."""
    blurred = img.convert("RGB").filter(ImageFilter.GaussianBlur(sigma * min(img.size)))
    return _img(np.asarray(blurred, np.float32) * k)


def mask_circle(mask: np.ndarray) -> tuple[float, float, float]:
    """Centre and radius of a field-of-view mask (bool H x W): the centroid of the mask's widest row and column
    extents would be biased by a clipped circle, so: least-squares circle through the mask's boundary pixels
    that are not on the image edge."""
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:-1, 1:-1] = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    edge = m & ~inner
    edge[0, :] = edge[-1, :] = False
    edge[:, 0] = edge[:, -1] = False
    ys, xs = np.nonzero(edge)
    x, y = xs.astype(np.float64) + 0.5, ys.astype(np.float64) + 0.5
    a = np.c_[2 * x, 2 * y, np.ones_like(x)]
    sol = np.linalg.lstsq(a, x * x + y * y, rcond=None)[0]
    cx, cy = float(sol[0]), float(sol[1])
    return cx, cy, math.sqrt(max(float(sol[2]) + cx * cx + cy * cy, 0.0))


def iou_with_circle(mask: np.ndarray, cx: float, cy: float, radius: float) -> float:
    """Intersection over union of a mask (bool H x W) and a circle clipped to the frame (pixel coordinates)."""
    h, w = mask.shape
    yy, xx = np.ogrid[0:h, 0:w]
    circle = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= radius * radius
    m = mask.astype(bool)
    union = int((m | circle).sum())
    return int((m & circle).sum()) / union if union else 0.0


__all__ = ["PIGMENT_RANGE", "blurred_dark", "central_shadow", "inscribed_crop", "iou_with_circle", "mask_circle",
           "pigmented", "underexposed"]
