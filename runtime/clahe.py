"""Contrast-limited adaptive histogram equalisation (Zuiderveld 1994) in numpy, following OpenCV's
``cv2.createCLAHE(clipLimit, (tiles, tiles)).apply`` step for step on 8-bit images, so that models trained with
OpenCV-style preprocessing see the same input on a device without OpenCV (tests compare the two).
"""

from __future__ import annotations

import numpy as np

HIST = 256


def _extend(img: np.ndarray, tiles: int) -> np.ndarray:
    """OpenCV pads bottom/right by reflection (BORDER_REFLECT_101) unless both sides divide evenly, and then
    by `tiles - (side % tiles)` on both sides (a full extra `tiles` where one side already divides)."""
    h, w = img.shape
    if h % tiles == 0 and w % tiles == 0:
        return img
    return np.pad(img, ((0, tiles - h % tiles), (0, tiles - w % tiles)), mode="reflect")


def _luts(ext: np.ndarray, tiles: int, clip_limit: float) -> tuple[np.ndarray, int, int]:
    """Per-tile lookup tables (tiles * tiles, 256) uint8, and the tile's (height, width)."""
    th, tw = ext.shape[0] // tiles, ext.shape[1] // tiles
    area = th * tw
    blocks = ext[: th * tiles, : tw * tiles].reshape(tiles, th, tiles, tw).transpose(0, 2, 1, 3)
    flat = blocks.reshape(tiles * tiles, area).astype(np.int64)
    flat += (np.arange(tiles * tiles, dtype=np.int64) * HIST)[:, None]
    hist = np.bincount(flat.ravel(), minlength=tiles * tiles * HIST).reshape(tiles * tiles, HIST)
    if clip_limit > 0:
        limit = max(int(clip_limit * area / HIST), 1)
        clipped = np.maximum(hist - limit, 0).sum(axis=1)
        hist = np.minimum(hist, limit)
        batch, residual = clipped // HIST, clipped % HIST
        hist += batch[:, None]
        for i in np.flatnonzero(residual):
            step = max(HIST // int(residual[i]), 1)
            idx = np.arange(0, HIST, step)[: int(residual[i])]
            hist[i, idx] += 1
    scale = np.float32((HIST - 1) / area)
    cum = np.cumsum(hist, axis=1).astype(np.float32) * scale
    return np.clip(np.rint(cum), 0, 255).astype(np.uint8), th, tw


def _axis_weights(n: int, tile: int, tiles: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each pixel along one axis: the two neighbouring tile indices and the weight of the second."""
    f = np.arange(n, dtype=np.float32) * np.float32(1.0 / tile) - np.float32(0.5)
    i1 = np.floor(f).astype(np.int64)
    a = (f - i1).astype(np.float32)
    return np.clip(i1, 0, tiles - 1), np.clip(i1 + 1, 0, tiles - 1), a


def clahe(img: np.ndarray, clip_limit: float = 2.0, tiles: int = 8) -> np.ndarray:
    """CLAHE of a (h, w) uint8 image with a `tiles` x `tiles` grid; returns uint8 of the same shape."""
    if img.dtype != np.uint8 or img.ndim != 2:
        raise ValueError("clahe needs a 2-D uint8 image")
    h, w = img.shape
    luts, th, tw = _luts(_extend(img, tiles), tiles, clip_limit)
    ty1, ty2, ya = _axis_weights(h, th, tiles)
    tx1, tx2, xa = _axis_weights(w, tw, tiles)
    out = np.empty((h, w), np.float32)
    xa1 = np.float32(1.0) - xa
    rows = 64  # bounded temporaries on small devices
    for r0 in range(0, h, rows):
        sl = slice(r0, min(h, r0 + rows))
        v = img[sl].astype(np.int64)
        a = ya[sl][:, None]
        base1, base2 = (ty1[sl] * tiles)[:, None], (ty2[sl] * tiles)[:, None]
        top = luts[base1 + tx1[None], v] * xa1 + luts[base1 + tx2[None], v] * xa
        bottom = luts[base2 + tx1[None], v] * xa1 + luts[base2 + tx2[None], v] * xa
        out[sl] = top * (np.float32(1.0) - a) + bottom * a
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
