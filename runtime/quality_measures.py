"""The image-quality measures (see :mod:`.quality` for what each measures and how it is judged), computed inside
the detected field of view on the quality crop. Numpy + pillow only."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from .fov import FieldOfView


# --------------------------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class _Masks:
    inner: np.ndarray  # bool (S, S): retina well inside the field of view and the frame
    outside: np.ndarray  # bool: in the frame, clearly outside the circle
    visible: float  # fraction of the circle inside the frame


@lru_cache(maxsize=8)
def _radius2(size: int) -> np.ndarray:
    """Squared distance of each pixel centre from the crop centre, in units of the crop's half side."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / (size / 2.0) - 1.0
    d2 = c[None, :] ** 2 + c[:, None] ** 2
    d2.setflags(write=False)
    return d2


def _masks(fov: FieldOfView, decoded_size: tuple[int, int], size: int) -> _Masks:
    """Where the field of view and the frame lie in a square crop of ``size`` (see preprocess.crop_resize)."""
    r = max(fov.radius, 0.5)
    x0, y0 = fov.cx - r, fov.cy - r
    k = size / (2.0 * r)
    w, h = decoded_size
    c = np.arange(size, dtype=np.float32) + 0.5
    # The frame (the decoded image) in crop pixel coordinates; outside it the crop is black padding.
    fx0, fx1, fy0, fy1 = -x0 * k, (w - x0) * k, -y0 * k, (h - y0) * k

    def in_frame(inset: float) -> np.ndarray:
        col = (c >= fx0 + inset) & (c <= fx1 - inset)
        row = (c >= fy0 + inset) & (c <= fy1 - inset)
        return row[:, None] & col[None, :]

    d2 = _radius2(size)
    circle = d2 <= 1.0
    visible = float((circle & in_frame(0.0)).sum() / max(int(circle.sum()), 1))
    inset = max(2.0, size / 64.0)
    inner = (d2 <= 0.88**2) & in_frame(inset)
    outside = (d2 >= 1.06**2) & in_frame(inset / 2)
    return _Masks(inner, outside, visible)


# --------------------------------------------------------------------------------------------- filters
def _max_filter(a: np.ndarray, k: int) -> np.ndarray:
    """k x k maximum over the window clipped to the array (the same as replicating the edges)."""
    out = a.copy()
    for d in range(1, k // 2 + 1):
        np.maximum(out[d:], a[:-d], out=out[d:])
        np.maximum(out[:-d], a[d:], out=out[:-d])
    res = out.copy()
    for d in range(1, k // 2 + 1):
        np.maximum(res[:, d:], out[:, :-d], out=res[:, d:])
        np.maximum(res[:, :-d], out[:, d:], out=res[:, :-d])
    return res


def _min_filter(a: np.ndarray, k: int) -> np.ndarray:
    return -_max_filter(-a, k)


def _smooth121(a: np.ndarray) -> np.ndarray:
    """Separable [1 2 1]/4 smoothing (a Gaussian of sigma ~0.7 px), valid region only: (S-2) x (S-2)."""
    rows = a[:, :-2] + 2.0 * a[:, 1:-1] + a[:, 2:]
    return (rows[:-2] + 2.0 * rows[1:-1] + rows[2:]) * (1.0 / 16.0)


def _kth(values: np.ndarray, q: float) -> float:
    """The q-quantile (0..1) by partial sort: cheaper than np.percentile, no interpolation."""
    if values.size == 0:
        return 0.0
    k = min(int(q * values.size), values.size - 1)
    return float(np.partition(values, k)[k])


def _block_reduce(a: np.ndarray, block: int) -> np.ndarray:
    """Means of non-overlapping block x block tiles (the ragged edge is dropped)."""
    s = a.shape[0] // block * block
    n = s // block
    return a[:s, :s].reshape(s, n, block).sum(axis=2).reshape(n, block, n).sum(axis=1) * (1.0 / (block * block))


# --------------------------------------------------------------------------------------------- measures
_DARK_FLOOR = 25.0  # grey levels: relative measures never divide by less (guards dark, noisy frames)
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
# For a normal variable, E|X| over the lower half of |X|, divided by its standard deviation.
_LOWER_HALF_MEAN = 0.3248
# Directions for the re-blur sharpness: (dy, dx) steps of the fine and the coarse difference.
_DIRECTIONS = ((0, 1), (1, 0), (1, 1), (1, -1))


def compute_measures(image: Image.Image, fov: FieldOfView, decoded_size: tuple[int, int]) -> dict[str, float]:
    """All measures of one quality crop (square RGB, the field of view's bounding square)."""
    w, h = decoded_size
    out: dict[str, float] = {
        "fov_found": 1.0 if fov.found else 0.0,
        "fov_size": 2.0 * fov.radius / min(w, h),
        "fov_centring": math.hypot(fov.cx - w / 2.0, fov.cy - h / 2.0) / max(fov.radius, 1.0),
    }
    # Box-averaged copies: quarter resolution (RGB) for illumination and colour, half resolution (green) for
    # contrast and vessels, full resolution (green) for noise and focus.
    hs, qs = image.size[0] // 2, image.size[0] // 4
    mh = _masks(fov, decoded_size, hs)
    mq = _masks(fov, decoded_size, qs)
    out["fov_visible"] = mh.visible
    inner_h, inner_q = mh.inner, mq.inner
    if int(inner_h.sum()) < 0.05 * hs * hs:  # no usable retina (field of view almost out of the frame)
        inner_h = np.zeros_like(inner_h)
        inner_h[hs // 4: 3 * hs // 4, hs // 4: 3 * hs // 4] = True
        inner_q = inner_h[::2, ::2][:qs, :qs]
    if int(inner_q.sum()) < 16:  # a sliver of retina: the half-resolution mask, subsampled
        inner_q = inner_h[::2, ::2][:qs, :qs]
    rgb_q = np.asarray(image.reduce(4), dtype=np.float32)[:qs, :qs]  # (reduce rounds odd sizes up)
    luma = rgb_q @ _LUMA
    y_in = luma[inner_q]
    mean_y = float(y_in.mean()) if y_in.size else 0.0
    # Field-of-view surround: a fundus camera's circle sits on black.
    out["fov_border"] = (float(luma[mq.outside].mean()) / max(mean_y, _DARK_FLOOR)
                         if mq.outside.sum() >= 0.005 * qs * qs else 0.0)
    # Exposure and illumination.
    out["brightness"] = mean_y / 255.0
    out["saturated"] = float((y_in >= 235.0).mean()) if y_in.size else 0.0
    out["dark_area"] = _dark_area(luma, inner_q, max(2, qs // 14))

    # Green channel at half resolution: local contrast and vessel visibility (black top-hat).
    g8 = image.getchannel("G")
    g_h = np.asarray(g8.reduce(2), dtype=np.float32)[:hs, :hs]
    mean_g = max(float(g_h[inner_h].mean()), _DARK_FLOOR)
    blk = max(4, hs // 16)
    gb = _block_reduce(g_h, blk)
    local_var = np.maximum(_block_reduce(g_h * g_h, blk) - gb * gb, 0.0)
    inner_b = _block_reduce(inner_h.astype(np.float32), blk) >= 0.99
    out["contrast"] = (math.sqrt(float(local_var[inner_b].mean())) / mean_g) if inner_b.any() else 0.0
    k = max(3, (hs // 28) | 1)
    closing = _min_filter(_max_filter(g_h, k), k)
    tophat = ((closing - g_h) / np.maximum(closing, _DARK_FLOOR))[inner_h]
    out["vessels"] = _kth(tophat, 0.98)

    # Colour plausibility of a retina, on lit pixels.
    sub = rgb_q[inner_q]
    lit = sub[y_in > 20.0]
    if len(lit) < 0.05 * len(sub) or len(lit) < 16:
        lit = sub
    r, gg, b = lit[:, 0], lit[:, 1], lit[:, 2]
    out["red_share"] = float(r.sum() / max(float(lit.sum()), 1.0))
    out["channel_order"] = float(((r >= gg) & (gg + 4.0 >= b)).mean())
    x = r - 0.5 * (gg + b)
    yv = 0.8660254 * (gg - b)
    total_c = float(np.hypot(x, yv).sum())
    if total_c <= 1e-6:
        out["hue_spread"] = 180.0
    else:  # circular std of the hue, weighted by chroma: sum(c cos h) = sum(x), sum(c sin h) = sum(y)
        rho = math.hypot(float(x.sum()), float(yv.sum())) / total_c
        out["hue_spread"] = math.degrees(math.sqrt(-2.0 * math.log(min(max(rho, 1e-9), 1.0))))  # rho may round past 1

    # Full resolution, green channel: noise and focus, sampled on the 2 x 2 lattice of centres (2i+1, 2j+1),
    # which are the half-resolution pixels (i, j): the half-resolution mask says which lie in the field of view.
    # Every other row of those centres is enough for the statistics.
    g = np.asarray(g8, dtype=np.float32)
    sample = inner_h.copy()
    sample[1::2] = False
    # Immerkaer's noise kernel [1 -2 1] x [1 -2 1]
    d2x = g[:, 0:-2:2] - 2.0 * g[:, 1:-1:2] + g[:, 2::2]
    resp = np.abs(d2x[0:-2:2] - 2.0 * d2x[1:-1:2] + d2x[2::2])
    resp = resp[sample[: resp.shape[0], : resp.shape[1]]]
    lower = np.partition(resp, resp.size // 2)[: resp.size // 2] if resp.size >= 2 else resp
    out["noise"] = float(lower.mean()) / (_LOWER_HALF_MEAN * 6.0) if lower.size else 0.0
    out["sharpness"], out["isotropy"] = _sharpness(g, sample)
    return out


def _sharpness(g: np.ndarray, inner_h: np.ndarray) -> tuple[float, float]:
    """Re-blur sharpness (after Crete-Roffet et al. 2007), the least over four directions, and the isotropy
    of the fine detail (motion blur).

    Sharpness: on the strongest coarse-scale edges of a direction, how much of the fine-scale difference
    survives a further blur: sharp edges lose much, blurred ones little. Noise does not survive to the coarse
    scale, so it does not pick the edges; the ratio cancels contrast. Sampled at the centres (2i+1, 2j+1) of
    the half-resolution pixels (i, j) of the field of view (``inner_h``). See :func:`_isotropy`.
    """
    h, w = g.shape
    m = 5  # the coarse image reaches 3 px, its 2-px difference 2 px further
    iy, ix = np.nonzero(inner_h)
    py, px = iy * 2 + 1, ix * 2 + 1
    keep = (py >= m) & (py < h - m) & (px >= m) & (px < w - m)
    py, px = py[keep], px[keep]
    if py.size < 64:
        return 0.0, 0.0
    y0, y1, x0, x1 = int(py.min()) - m, int(py.max()) + m + 1, int(px.min()) - m, int(px.max()) + m + 1
    fine = _smooth121(g[y0:y1, x0:x1])  # sigma ~0.7 px; index i <-> position i + 1
    coarse = _smooth121(_smooth121(fine))  # sigma ~1.2 px; index i <-> position i + 3
    wf, wc = (x1 - x0) - 2, (x1 - x0) - 6
    at_f = (py - y0 - 1) * wf + (px - x0 - 1)
    at_c = (py - y0 - 3) * wc + (px - x0 - 3)
    ff, cf = fine.ravel(), coarse.ravel()
    here_f, here_c = ff[at_f], cf[at_c]
    iso = _isotropy(fine[2:-2, 2:-2] - coarse, at_c, wc)
    best = 1.0
    for dy, dx in _DIRECTIONS:
        d_fine = np.abs(ff[at_f + (dy * wf + dx)] - here_f)
        d_coarse = np.abs(cf[at_c + 2 * (dy * wc + dx)] - here_c) * 0.5
        edges = d_coarse >= max(_kth(d_coarse[::4], 0.9), 0.5)  # an approximate top decile is enough
        total = float(d_fine[edges].sum())
        if total <= 0:
            return 0.0, iso
        best = min(best, float(np.maximum(d_fine[edges] - d_coarse[edges], 0.0).sum()) / total)
    return best, iso


def _isotropy(band: np.ndarray, at: np.ndarray, width: int) -> float:
    """How evenly the fine detail runs in all directions: the ratio of the small to the large eigenvalue of the
    structure tensor of the fine band (fine minus coarse image) over the field of view, 0..1.

    A fundus photograph, sharp or soft, has fine detail (vessels, texture, sensor noise) in every direction:
    close to 1 even when the whole picture is soft. Camera shake smears it along one direction: far below 1.
    So a soft but steady camera is told apart from a shaken one by this measure, not by how sharp it is.
    ``band`` is aligned with the coarse image (flat indices ``at``, row width ``width``).
    """
    b = band.ravel()
    gx = b[at + 1] - b[at - 1]
    gy = b[at + width] - b[at - width]
    jxx, jyy, jxy = float(gx @ gx), float(gy @ gy), float(gx @ gy)
    half_trace = 0.5 * (jxx + jyy)
    if half_trace <= 0:
        return 0.0
    disc = math.sqrt(max(half_trace * half_trace - (jxx * jyy - jxy * jxy), 0.0))
    return (half_trace - disc) / (half_trace + disc)


def _dark_area(luma: np.ndarray, inner: np.ndarray, block: int) -> float:
    """Fraction of well-covered blocks whose mean luma is below 30 % of the 90th-percentile block."""
    cover = _block_reduce(inner.astype(np.float32), block)
    sums = _block_reduce(luma * inner, block)
    ok = cover >= 0.75
    if ok.sum() < 4:
        return 0.0
    means = sums[ok] / cover[ok]
    ref = max(_kth(means, 0.9), _DARK_FLOOR)
    return float((means < 0.3 * ref).mean())


# --------------------------------------------------------------------------------------------- decision
