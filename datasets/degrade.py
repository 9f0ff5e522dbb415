"""Synthetic image-quality problems and non-fundus pictures, for tuning and testing the quality gate.

FOR TESTING THE PIPELINE ONLY. Each degradation imitates a common reason why a handheld, non-mydriatic
fundus photograph is ungradable: defocus and motion blur, under- and over-exposure, a very dark and noisy
frame, haze or flare, a small pupil (dark periphery), a misaligned eye (dark crescent), eyelash shadows and
lens dust, a field of view half out of the frame, sensor noise. The severities are chosen so that a grader
would reject the picture, not to sit on the boundary. :func:`non_fundus` draws procedural pictures of what
ends up in front of the camera instead of a retina: documents, floors, face-like blobs, skies, round
objects, random scenes, a covered lens.

Every function is deterministic given its ``rng``. Images are RGB ``PIL.Image`` objects.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import UsageError
from .synthetic import generate

Degradation = Callable[[Image.Image, np.random.Generator], Image.Image]


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.float32)


def _img(arr: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _radius(img: Image.Image) -> np.ndarray:
    """Distance from the image centre in units of half the short side."""
    w, h = img.size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.sqrt((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (min(w, h) / 2)


def _fov_mask(img: Image.Image) -> np.ndarray:
    """Where the picture is not black border (float 0..1), so degradations stay inside the field of view."""
    a = _arr(img).max(axis=2)
    m = Image.fromarray((a > 12).astype(np.uint8) * 255, "L").filter(ImageFilter.GaussianBlur(1.5))
    return np.asarray(m, dtype=np.float32)[:, :, None] / 255.0


def blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Defocus: Gaussian blur, sigma 0.7-2 % of the image side (4-10 px at 512 px)."""
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.007, 0.02) * min(img.size)))


def motion_blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Camera shake: a straight smear of 2.5-6 % of the image side in a random direction."""
    a = _arr(img)
    length = rng.uniform(0.025, 0.06) * min(img.size)
    angle = rng.uniform(0, math.pi)
    n = max(3, round(length))
    acc = np.zeros_like(a)
    for t in np.linspace(-length / 2, length / 2, n):
        dx, dy = round(t * math.cos(angle)), round(t * math.sin(angle))
        acc += np.roll(a, (dy, dx), axis=(0, 1))
    return _img(acc / n)


def underexposed(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Too little light: 12-30 % of the exposure, with the sensor noise that comes with it."""
    a = _arr(img) * rng.uniform(0.12, 0.3)
    a += rng.normal(0, rng.uniform(1.0, 3.0), a.shape).astype(np.float32)
    return _img(a)


def dark_noisy(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Almost no light, digitally amplified: dark and very noisy (can look 'vessel-rich' to naive measures)."""
    a = _arr(img) * rng.uniform(0.06, 0.16)
    a += rng.normal(0, rng.uniform(4.0, 10.0), a.shape).astype(np.float32)
    return _img(np.abs(a))


def overexposed(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Too much light: 2.5-5x the exposure, channels clip, and scattered light veils the washed-out retina."""
    a = _arr(img) * rng.uniform(2.5, 5.0)
    k = rng.uniform(0.2, 0.45)
    m = _fov_mask(img)
    return _img((np.minimum(a, 255.0) * (1 - k) + 250.0 * k) * m + _arr(img) * (1 - m))


def haze(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Flare or a cloudy lens: a bright veil over 55-80 % of the signal, plus slight softening."""
    a = _arr(img.filter(ImageFilter.GaussianBlur(0.004 * min(img.size))))
    k = rng.uniform(0.55, 0.8)
    veil = np.array([235, 200, 170], np.float32) * rng.uniform(0.85, 1.05)
    m = _fov_mask(img)
    return _img((a * (1 - k) + veil * k) * m + a * (1 - m))


def small_pupil(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Small pupil / strong vignetting: only a central patch is lit, the periphery falls to near black."""
    r = _radius(img)
    r0 = rng.uniform(0.2, 0.4)
    shade = np.exp(-np.maximum(r - r0, 0) ** 2 / (2 * rng.uniform(0.08, 0.16) ** 2))
    a = _arr(img) * shade[:, :, None]
    glow = np.exp(-(r / rng.uniform(0.15, 0.3)) ** 2)[:, :, None] * np.array([90, 60, 40], np.float32)
    return _img((a + glow * rng.uniform(0.0, 1.0)) * _fov_mask(img))


def misaligned(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Eye not centred on the optics: a dark (or flared) crescent covers 35-60 % of the field from one side."""
    w, h = img.size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    u = ((xx - w / 2) * math.cos(ang) + (yy - h / 2) * math.sin(ang)) / (min(w, h) / 2)
    edge = rng.uniform(-0.35, 0.1)  # in half-sides; the side beyond it is shadowed
    t = np.clip((u - edge) / 0.25, 0, 1)
    a = _arr(img)
    if rng.random() < 0.7:
        out = a * (1 - 0.92 * t)[:, :, None]
    else:
        out = a * (1 - t[:, :, None]) + np.array([240, 210, 170], np.float32) * t[:, :, None]
    return _img(out * _fov_mask(img))


def eyelashes(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Eyelash shadows (dark blurred arcs from one edge) and dust or reflections (bright blurred blobs)."""
    w, h = img.size
    s = min(w, h)
    shadow = Image.new("L", img.size, 0)
    d = ImageDraw.Draw(shadow)
    side = rng.uniform(0, 2 * math.pi)
    for _ in range(int(rng.integers(7, 14))):
        ang = side + rng.normal(0, 0.35)
        x0, y0 = w / 2 + 0.55 * s * math.cos(ang), h / 2 + 0.55 * s * math.sin(ang)
        pts = [(x0, y0)]
        heading = ang + math.pi + rng.normal(0, 0.3)
        for _k in range(6):
            heading += rng.normal(0, 0.12)
            pts.append((pts[-1][0] + 0.08 * s * math.cos(heading), pts[-1][1] + 0.08 * s * math.sin(heading)))
        d.line(pts, fill=255, width=max(2, int(s * rng.uniform(0.03, 0.06))))
    shadow = shadow.filter(ImageFilter.GaussianBlur(s * 0.02))
    a = _arr(img) * (1 - 0.85 * np.asarray(shadow, np.float32)[:, :, None] / 255)
    dust = Image.new("L", img.size, 0)
    dd = ImageDraw.Draw(dust)
    for _ in range(int(rng.integers(3, 9))):
        cx, cy = rng.uniform(0.25, 0.75) * w, rng.uniform(0.25, 0.75) * h
        r = s * rng.uniform(0.03, 0.09)
        dd.ellipse([cx - r, cy - r, cx + r, cy + r], fill=int(rng.integers(120, 230)))
    dust_a = np.asarray(dust.filter(ImageFilter.GaussianBlur(s * 0.015)), np.float32)[:, :, None] / 255
    a = a * (1 - dust_a) + 235 * dust_a
    return _img(a * _fov_mask(img))


def off_centre(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The field of view half out of the frame: shifted by 55-85 % of its radius."""
    w, h = img.size
    ang = rng.uniform(0, 2 * math.pi)
    shift = rng.uniform(0.55, 0.85) * min(w, h) / 2
    out = Image.new("RGB", img.size, (0, 0, 0))
    out.paste(img, (round(shift * math.cos(ang)), round(shift * math.sin(ang))))
    return out


def noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Strong sensor noise (sigma 16-32 grey levels at 512 px), e.g. a high-ISO handheld frame."""
    a = _arr(img)
    sigma = rng.uniform(16, 32) * min(img.size) / 512
    m = _fov_mask(img)
    return _img(a + rng.normal(0, sigma, a.shape).astype(np.float32) * m)


DEGRADATIONS: dict[str, Degradation] = {
    "blur": blur,
    "motion-blur": motion_blur,
    "underexposed": underexposed,
    "dark-noisy": dark_noisy,
    "overexposed": overexposed,
    "haze": haze,
    "small-pupil": small_pupil,
    "misaligned": misaligned,
    "eyelashes": eyelashes,
    "off-centre": off_centre,
    "noise": noise,
}


def degrade(img: Image.Image, kind: str, rng: np.random.Generator) -> Image.Image:
    if kind not in DEGRADATIONS:
        raise UsageError(f"unknown degradation {kind!r}; known: {sorted(DEGRADATIONS)}")
    return DEGRADATIONS[kind](img.convert("RGB"), rng)


# ------------------------------------------------------------------------------------------ non-fundus
def _smooth(rng: np.random.Generator, w: int, h: int, cells: int) -> np.ndarray:
    grid = rng.uniform(0, 255, (cells, max(2, cells * w // h))).astype(np.uint8)
    return np.asarray(Image.fromarray(grid, "L").resize((w, h), Image.Resampling.BICUBIC), np.float32) / 255.0


def _size(rng: np.random.Generator, base: int) -> tuple[int, int]:
    aspect = float(rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9]))
    w = base
    h = round(base / aspect)
    return (w, h) if rng.random() < 0.7 else (h, w)


def _document(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    table = np.array(rng.uniform([60, 40, 20], [200, 160, 120]), np.float32)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in table))
    d = ImageDraw.Draw(img)
    paper = tuple(int(v) for v in rng.uniform([215, 210, 190], [255, 252, 245]))
    mx, my = rng.uniform(0.02, 0.2) * w, rng.uniform(0.02, 0.2) * h
    quad = [(mx + rng.normal(0, 8), my + rng.normal(0, 8)), (w - mx + rng.normal(0, 8), my + rng.normal(0, 8)),
            (w - mx + rng.normal(0, 8), h - my + rng.normal(0, 8)), (mx + rng.normal(0, 8), h - my + rng.normal(0, 8))]
    d.polygon(quad, fill=paper)
    ink = tuple(int(v) for v in rng.uniform([0, 0, 0], [60, 60, 120]))
    y = my + 0.06 * h
    while y < h - my - 0.05 * h:
        x = mx + 0.06 * w
        while x < w - mx - 0.08 * w:
            word = rng.uniform(0.02, 0.08) * w
            d.rectangle([x, y, x + word, y + max(2, 0.012 * h)], fill=ink)
            x += word + 0.015 * w
        y += rng.uniform(0.025, 0.045) * h
    a = _arr(img) * (0.75 + 0.25 * _smooth(rng, w, h, 3))[:, :, None]  # uneven room light
    return _img(a)


def _floor(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    kind = rng.integers(0, 3)
    if kind == 0:  # wooden planks, from pale oak to mahogany
        base = np.array(rng.uniform([110, 45, 20], [200, 150, 100]), np.float32)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        plank = max(8, int(rng.uniform(0.06, 0.15) * h))
        grain = np.sin(xx * rng.uniform(0.05, 0.2) + 6 * _smooth(rng, w, h, 8) * 6) * 0.08
        stripes = ((yy // plank) % 2) * rng.uniform(0.05, 0.15)
        gaps = ((yy % plank) < 2).astype(np.float32) * 0.5
        a = base * (1 + grain - stripes - gaps)[:, :, None]
    elif kind == 1:  # tiles
        c1 = np.array(rng.uniform(40, 240, 3), np.float32)
        c2 = c1 * rng.uniform(0.6, 1.0)
        yy, xx = np.mgrid[0:h, 0:w]
        t = int(rng.uniform(0.1, 0.25) * min(w, h))
        checker = ((xx // t + yy // t) % 2).astype(np.float32)[:, :, None]
        grout = (((xx % t) < 3) | ((yy % t) < 3)).astype(np.float32)[:, :, None]
        a = (c1 * checker + c2 * (1 - checker)) * (1 - grout) + 200 * grout
    else:  # carpet
        c = np.array(rng.uniform(30, 220, 3), np.float32)
        a = c * (0.8 + 0.4 * _smooth(rng, w, h, 40))[:, :, None]
        a += rng.normal(0, 12, (h, w, 3)).astype(np.float32)
    shade = 0.6 + 0.5 * _smooth(rng, w, h, 2)
    return _img(a * shade[:, :, None])


def _face(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    bg = tuple(int(v) for v in (rng.uniform(0, 40, 3) if rng.random() < 0.5 else rng.uniform(40, 230, 3)))
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    skin = np.array(rng.choice([[235, 195, 170], [220, 170, 135], [190, 135, 100], [140, 95, 70], [95, 60, 45]]),
                    np.float32) * rng.uniform(0.85, 1.1) * np.array([1.0, rng.uniform(0.9, 1.0), 1.0])
    cx, cy = w / 2 + rng.normal(0, 0.05 * w), h / 2 + rng.normal(0, 0.05 * h)
    fw, fh = rng.uniform(0.25, 0.4) * min(w, h), rng.uniform(0.35, 0.48) * min(w, h)
    hair = tuple(int(v) for v in rng.uniform([10, 5, 0], [120, 80, 50]))
    d.ellipse([cx - fw * 1.1, cy - fh * 1.15, cx + fw * 1.1, cy + fh * 0.3], fill=hair)
    d.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=tuple(int(min(v, 255)) for v in skin))
    for sx in (-1, 1):
        ex, ey = cx + sx * fw * 0.4, cy - fh * 0.15
        d.ellipse([ex - fw * 0.16, ey - fh * 0.07, ex + fw * 0.16, ey + fh * 0.07], fill=(245, 245, 245))
        d.ellipse([ex - fw * 0.07, ey - fh * 0.07, ex + fw * 0.07, ey + fh * 0.07], fill=(50, 35, 25))
        d.line([(ex - fw * 0.2, ey - fh * 0.17), (ex + fw * 0.2, ey - fh * 0.2)], fill=hair, width=max(2, w // 80))
    d.ellipse([cx - fw * 0.35, cy + fh * 0.45, cx + fw * 0.35, cy + fh * 0.6], fill=(170, 70, 70))
    img = img.filter(ImageFilter.GaussianBlur(min(w, h) * 0.004))
    a = _arr(img) * (0.75 + 0.35 * _smooth(rng, w, h, 3))[:, :, None]
    return _img(a + rng.normal(0, 3, a.shape).astype(np.float32))


def _sky(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    if rng.random() < 0.6:  # blue sky with clouds
        top, bottom = np.array([40, 90, 200], np.float32), np.array([150, 190, 240], np.float32)
        cloud_c = np.array([245, 245, 250], np.float32)
    else:  # sunset
        top, bottom = np.array([90, 60, 120], np.float32), np.array([250, 140, 50], np.float32)
        cloud_c = np.array([255, 200, 120], np.float32)
    a = top * (1 - yy) + bottom * yy
    clouds = np.clip((_smooth(rng, w, h, 6) - rng.uniform(0.4, 0.7)) * 3, 0, 1)[:, :, None]
    a = a * (1 - clouds) + cloud_c * clouds
    if rng.random() < 0.5:  # a dark horizon (hills, roofs)
        hz = (0.7 + 0.2 * _smooth(rng, w, 8, 4)[0]) * h
        ground = np.arange(h)[:, None] > hz[None, :]
        a[ground] = np.array(rng.uniform(10, 60, 3), np.float32)
    return _img(a)


def _round_object(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """An orange, a ball, a lamp: round, often orange-red, on a dark surround - the hardest look-alike."""
    bg = np.array(rng.uniform(0, 35, 3), np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = rng.uniform(0.3, 0.48) * min(w, h)
    cx, cy = w / 2 + rng.normal(0, 0.04 * w), h / 2 + rng.normal(0, 0.04 * h)
    rr = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / r
    colour = np.array(rng.choice([[240, 120, 20], [220, 60, 30], [200, 150, 40], [250, 200, 150], [180, 40, 40]]),
                      np.float32) * rng.uniform(0.8, 1.05)
    shade = (1.0 - 0.5 * np.clip(rr, 0, 1) ** 2) * (1 + 0.08 * (_smooth(rng, w, h, 30) - 0.5))
    highlight = np.exp(-(((xx - cx + 0.3 * r) ** 2 + (yy - cy + 0.3 * r) ** 2) / (0.15 * r) ** 2))
    inside = (rr <= 1).astype(np.float32)[:, :, None]
    obj = colour * shade[:, :, None] + 120 * highlight[:, :, None]
    a = obj * inside + bg * (1 - inside)
    return _img(a + rng.normal(0, 3, a.shape).astype(np.float32))


def _scene(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    a = np.zeros((h, w, 3), np.float32) + np.array(rng.uniform(0, 255, 3), np.float32)
    img = _img(a * (0.6 + 0.6 * _smooth(rng, w, h, 4))[:, :, None])
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(5, 25))):
        c = tuple(int(v) for v in rng.uniform(0, 255, 3))
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        s = rng.uniform(0.05, 0.4) * min(w, h)
        if rng.random() < 0.5:
            d.rectangle([x, y, x + s, y + s * rng.uniform(0.3, 2)], fill=c)
        else:
            d.ellipse([x - s / 2, y - s / 2, x + s / 2, y + s / 2], fill=c)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 2)))


def _lens_cap(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """A covered lens or a closed eyelid in the dark: almost black, noisy, maybe a faint warm glow."""
    a = np.zeros((h, w, 3), np.float32) + np.array(rng.uniform([0, 0, 0], [25, 12, 8]), np.float32)
    a *= (0.5 + _smooth(rng, w, h, 3))[:, :, None]
    return _img(np.abs(a + rng.normal(0, rng.uniform(1, 6), a.shape).astype(np.float32)))


NON_FUNDUS: dict[str, Callable[[np.random.Generator, int, int], Image.Image]] = {
    "document": _document,
    "floor": _floor,
    "face": _face,
    "sky": _sky,
    "round-object": _round_object,
    "scene": _scene,
    "lens-cap": _lens_cap,
}


def non_fundus(kind: str, seed: int, size: int = 480) -> Image.Image:
    """A procedural picture that is not a fundus photograph (``kind`` in :data:`NON_FUNDUS`)."""
    if kind not in NON_FUNDUS:
        raise UsageError(f"unknown non-fundus kind {kind!r}; known: {sorted(NON_FUNDUS)}")
    rng = np.random.default_rng(seed)
    w, h = _size(rng, size)
    return NON_FUNDUS[kind](rng, w, h)


# ------------------------------------------------------------------------------------------- quality set
@dataclass(frozen=True)
class QualitySample:
    image: Image.Image
    label: str  # "good" | "bad" | "non-fundus"
    kind: str  # "good", a degradation name or a non-fundus kind
    camera: str | None
    seed: int


def quality_set(n_good: int, n_bad_each: int, n_non_fundus_each: int, seed: int = 0, size: int = 384,
                cameras: tuple[str, ...] = ("desktop", "handheld", "darkred"),
                degradations: tuple[str, ...] | None = None) -> Iterator[QualitySample]:
    """Good synthetic fundus photos, degraded copies of other synthetic photos, and non-fundus pictures.

    Good image i and bad image j use different generator seeds; cameras rotate within each group.
    """
    kinds = degradations or tuple(DEGRADATIONS)
    base = seed * 1_000_003
    for i in range(n_good):
        cam = cameras[i % len(cameras)]
        yield QualitySample(generate(base + i, size=size, camera=cam).image, "good", "good", cam, base + i)
    k = 0
    for kind in kinds:
        for _ in range(n_bad_each):
            s = base + 500_000 + k
            cam = cameras[k % len(cameras)]
            img = generate(s, size=size, camera=cam).image
            yield QualitySample(degrade(img, kind, np.random.default_rng(s)), "bad", kind, cam, s)
            k += 1
    for kind in NON_FUNDUS:
        for _ in range(n_non_fundus_each):
            s = base + 900_000 + k
            yield QualitySample(non_fundus(kind, s, size=round(size * 1.25)), "non-fundus", kind, None, s)
            k += 1
