"""Deterministic synthetic fundus photographs with an ICDR-like grade derived from what was drawn.

FOR TESTING THE PIPELINE ONLY. These pictures exercise decoding, field-of-view detection, quantization,
the accuracy gate and the runtime end to end. A model trained on them says nothing about real eyes; no
clinical claim may rest on them.

Each image: a circular field of view on black, an orange-red textured retina with vignetting, an optic disc
with a cup, a darker macula, a branching vessel tree, and DR lesions: microaneurysms (MA), dot/blot
haemorrhages (H), hard exudates (EX), cotton-wool spots (CWS) and new vessels (NV).

Grade from the drawing (a simplification of ICDR):
  0 nothing; 1 MAs only; 2 any H/EX/CWS below the severe rule; 3 >= 16 haemorrhages spread over all four
  quadrants; 4 new vessels. Referable = grade >= 2.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..errors import UsageError

LABELS_HEADER = ("image", "level")


@dataclass(frozen=True)
class CameraProfile:
    """How a camera renders a retina: colour gains, exposure and vignetting."""

    name: str
    retina_rgb: tuple[int, int, int]
    gain: tuple[float, float, float] = (1.0, 1.0, 1.0)
    vignetting: float = 0.45
    noise: float = 3.0
    blur: float = 0.6


CAMERAS: dict[str, CameraProfile] = {
    "desktop": CameraProfile("desktop", (205, 92, 38)),
    "handheld": CameraProfile("handheld", (215, 120, 55), gain=(0.95, 1.0, 1.1), vignetting=0.6, noise=5.0, blur=0.9),
    "darkred": CameraProfile("darkred", (170, 60, 30), gain=(1.05, 0.9, 0.85), vignetting=0.5, noise=4.0),
}


@dataclass
class Lesions:
    microaneurysms: int = 0
    haemorrhages: int = 0
    haemorrhage_quadrants: int = 0
    exudates: int = 0
    cotton_wool: int = 0
    new_vessels: bool = False

    def grade(self) -> int:
        if self.new_vessels:
            return 4
        if self.haemorrhages >= 16 and self.haemorrhage_quadrants == 4:
            return 3
        if self.haemorrhages or self.exudates or self.cotton_wool:
            return 2
        if self.microaneurysms:
            return 1
        return 0


@dataclass
class SyntheticFundus:
    image: Image.Image
    grade: int
    lesions: Lesions
    seed: int
    camera: str
    extra: dict[str, float] = field(default_factory=dict)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1] of shape (size, size): a random grid upsampled bicubically."""
    grid = rng.uniform(0, 255, (cells, cells)).astype(np.uint8)
    up = Image.fromarray(grid, "L").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(up, dtype=np.float32) / 127.5 - 1.0


def _polar(cx: float, cy: float, r: float, a: float) -> tuple[float, float]:
    return cx + r * math.cos(a), cy + r * math.sin(a)


def _vessel(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    x: float,
    y: float,
    angle: float,
    width: float,
    length: float,
    depth: int,
    colour: tuple[int, int, int, int],
    bend: float,
) -> None:
    step = max(2.0, length / 14)
    travelled = 0.0
    while travelled < length and width > 0.6:
        angle += bend + rng.normal(0, 0.12)
        nx, ny = x + step * math.cos(angle), y + step * math.sin(angle)
        draw.line([(x, y), (nx, ny)], fill=colour, width=max(1, round(width)))
        x, y = nx, ny
        travelled += step
        width *= 0.985
        if depth > 0 and rng.random() < 0.09:
            side = 1 if rng.random() < 0.5 else -1
            _vessel(draw, rng, x, y, angle + side * rng.uniform(0.5, 1.0), width * 0.7,
                    (length - travelled) * rng.uniform(0.5, 0.9), depth - 1, colour, -bend * 0.5)


def generate(
    seed: int,
    size: int = 512,
    grade: int | None = None,
    camera: str | CameraProfile = "desktop",
    referable_rate: float = 0.4,
) -> SyntheticFundus:
    """Draw one synthetic fundus photograph. Same arguments, same pixels."""
    if size < 64:
        raise UsageError(f"synthetic size must be >= 64, got {size}")
    cam = CAMERAS[camera] if isinstance(camera, str) else camera
    rng = np.random.default_rng(seed)
    if grade is None:
        if rng.random() < referable_rate:
            grade = int(rng.choice([2, 3, 4], p=[0.6, 0.25, 0.15]))
        else:
            grade = int(rng.choice([0, 1], p=[0.65, 0.35]))
    if grade not in range(5):
        raise UsageError(f"grade must be 0..4, got {grade}")

    s = size
    cx = s / 2 + rng.normal(0, s * 0.01)
    cy = s / 2 + rng.normal(0, s * 0.01)
    R = s * rng.uniform(0.44, 0.48)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    rr = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / R

    # Retina: base colour, low-frequency mottling, fine choroidal texture, vignetting.
    base = np.asarray(cam.retina_rgb, dtype=np.float32) * rng.uniform(0.88, 1.1)
    mottle = _smooth_noise(rng, s, 6) * 0.10 + _smooth_noise(rng, s, 24) * 0.05
    shade = 1.0 - cam.vignetting * np.clip(rr, 0, 1) ** 2.2
    img = base[None, None, :] * (shade * (1.0 + mottle))[:, :, None]

    # Eye side: disc to the left or right of the macula.
    side = 1 if rng.random() < 0.5 else -1
    disc_x = cx + side * R * rng.uniform(0.32, 0.42)
    disc_y = cy + rng.normal(0, R * 0.04)
    disc_r = R * rng.uniform(0.10, 0.13)
    mac_x, mac_y = cx - side * R * rng.uniform(0.05, 0.15), cy + rng.normal(0, R * 0.03)

    # Macula: a darker, slightly browner region with a bright foveal reflex.
    dm = np.sqrt((xx - mac_x) ** 2 + (yy - mac_y) ** 2) / (R * 0.22)
    img *= (1.0 - 0.35 * np.exp(-(dm**2)))[:, :, None]

    # Optic disc: bright yellow-orange with a paler cup.
    dd = np.sqrt((xx - disc_x) ** 2 + ((yy - disc_y) / 1.1) ** 2) / disc_r
    disc = np.clip(1.2 - dd, 0, 1) ** 0.6
    img = img * (1 - disc[:, :, None]) + np.array([250, 200, 120], np.float32) * disc[:, :, None]
    cup = np.exp(-((dd / 0.45) ** 2))
    img = img + np.array([5, 30, 40], np.float32) * cup[:, :, None]

    layer = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(layer, "RGBA")
    vessel_colour = (int(base[0] * 0.55), int(base[1] * 0.25), int(base[2] * 0.35), 200)
    for k in range(4):
        up = -1 if k < 2 else 1
        toward = -side if k % 2 == 0 else side
        a0 = math.atan2(up * 1.0, toward * (1.3 if k % 2 == 0 else 0.5))
        w0 = s * (0.012 if k % 2 == 0 else 0.008)
        _vessel(draw, rng, disc_x, disc_y, a0, w0, R * rng.uniform(1.0, 1.4), 3, vessel_colour,
                -up * toward * 0.045)

    lesions = _draw_lesions(draw, rng, grade, s, cx, cy, R, disc_x, disc_y, disc_r, mac_x, mac_y, base)

    # Camera: blur, colour gains, sensor noise, black outside the field of view.
    layer = layer.filter(ImageFilter.GaussianBlur(cam.blur * s / 512))
    arr = np.asarray(layer, dtype=np.float32) * np.asarray(cam.gain, np.float32)
    arr += rng.normal(0, cam.noise, arr.shape).astype(np.float32)
    edge = np.clip((1.0 - rr) * R / 1.5, 0, 1)
    arr *= edge[:, :, None]
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    drawn = lesions.grade()
    return SyntheticFundus(image=out, grade=drawn, lesions=lesions, seed=seed, camera=cam.name)


def _random_point_in_fov(rng: np.random.Generator, cx: float, cy: float, R: float,
                         avoid: tuple[float, float, float]) -> tuple[float, float, int]:
    while True:
        r = R * 0.85 * math.sqrt(rng.random())
        a = rng.uniform(0, 2 * math.pi)
        x, y = _polar(cx, cy, r, a)
        if math.hypot(x - avoid[0], y - avoid[1]) > avoid[2] * 1.6:
            quadrant = (0 if x >= cx else 1) + (0 if y < cy else 2)
            return x, y, quadrant


def _draw_lesions(draw: ImageDraw.ImageDraw, rng: np.random.Generator, grade: int, s: int, cx: float,
                  cy: float, R: float, disc_x: float, disc_y: float, disc_r: float, mac_x: float,
                  mac_y: float, base: np.ndarray) -> Lesions:
    les = Lesions()
    avoid = (disc_x, disc_y, disc_r)
    n_ma = {0: 0, 1: int(rng.integers(1, 6)), 2: int(rng.integers(3, 12)), 3: int(rng.integers(8, 20)),
            4: int(rng.integers(5, 20))}[grade]
    if grade == 2:
        n_h = int(rng.integers(0, 5))
        n_ex = int(rng.integers(0, 4))
        n_cws = int(rng.integers(0, 2))
        if n_h + n_ex + n_cws == 0:
            n_h = 1
    elif grade >= 3:
        n_h = int(rng.integers(16, 32))
        n_ex = int(rng.integers(0, 14))
        n_cws = int(rng.integers(1, 6))
    else:
        n_h = n_ex = n_cws = 0
    ma_r = max(1.0, s * 0.0035)
    # Moderate disease is often subtle: fainter lesions.
    alpha = int(235 * (rng.uniform(0.45, 0.9) if grade == 2 else 1.0))
    dark = (int(base[0] * 0.45), int(base[1] * 0.15), int(base[2] * 0.2), alpha)
    if grade <= 1:
        _draw_confounders(draw, rng, s, cx, cy, R, avoid, base)
    for _ in range(n_ma):
        x, y, _q = _random_point_in_fov(rng, cx, cy, R, avoid)
        r = ma_r * rng.uniform(0.8, 1.3)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=dark)
    les.microaneurysms = n_ma
    quadrants: set[int] = set()
    for i in range(n_h):
        x, y, q = _random_point_in_fov(rng, cx, cy, R, avoid)
        if grade >= 3 and i < 4:  # make sure the severe rule's 4-quadrant spread is real
            a = (i + rng.uniform(0.2, 0.8)) * math.pi / 2
            x, y = _polar(cx, cy, R * rng.uniform(0.3, 0.8), a)
            q = (0 if x >= cx else 1) + (0 if y < cy else 2)
        quadrants.add(q)
        r = s * rng.uniform(0.008, 0.02)
        draw.ellipse([x - r, y - r * rng.uniform(0.6, 1.0), x + r, y + r], fill=dark)
    les.haemorrhages = n_h
    les.haemorrhage_quadrants = len(quadrants)
    for _ in range(n_ex):
        x, y, _q = _random_point_in_fov(rng, cx, cy, R * 0.7, avoid)
        x = (x + mac_x) / 2
        y = (y + mac_y) / 2
        for _k in range(int(rng.integers(1, 5))):
            ex, ey = x + rng.normal(0, s * 0.012), y + rng.normal(0, s * 0.012)
            r = s * rng.uniform(0.003, 0.006)
            draw.ellipse([ex - r, ey - r, ex + r, ey + r], fill=(245, 225, 110, alpha))
    les.exudates = n_ex
    for _ in range(n_cws):
        x, y, _q = _random_point_in_fov(rng, cx, cy, R * 0.8, avoid)
        r = s * rng.uniform(0.015, 0.03)
        draw.ellipse([x - r, y - r * 0.7, x + r, y + r * 0.7], fill=(235, 215, 190, 150))
    les.cotton_wool = n_cws
    if grade == 4:
        nv_colour = (int(base[0] * 0.6), int(base[1] * 0.2), int(base[2] * 0.3), 220)
        for _ in range(int(rng.integers(12, 30))):
            a = rng.uniform(0, 2 * math.pi)
            x0, y0 = _polar(disc_x, disc_y, disc_r * rng.uniform(0.5, 1.8), a)
            pts = [(x0, y0)]
            for _k in range(5):
                a += rng.normal(0, 1.2)
                pts.append(_polar(pts[-1][0], pts[-1][1], s * 0.012, a))
            draw.line(pts, fill=nv_colour, width=max(1, int(s * 0.002)))
        les.new_vessels = True
    return les


def _draw_confounders(draw: ImageDraw.ImageDraw, rng: np.random.Generator, s: int, cx: float, cy: float,
                      R: float, avoid: tuple[float, float, float], base: np.ndarray) -> None:
    """Non-referable findings that look a little like lesions: drusen and pigment clumps."""
    if rng.random() < 0.35:
        for _ in range(int(rng.integers(2, 10))):
            x, y, _q = _random_point_in_fov(rng, cx, cy, R * 0.6, avoid)
            r = s * rng.uniform(0.003, 0.007)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(240, 215, 150, int(rng.integers(90, 170))))
    if rng.random() < 0.3:
        for _ in range(int(rng.integers(1, 4))):
            x, y, _q = _random_point_in_fov(rng, cx, cy, R, avoid)
            r = s * rng.uniform(0.005, 0.012)
            draw.ellipse([x - r, y - r, x + r, y + r],
                         fill=(int(base[0] * 0.35), int(base[1] * 0.3), int(base[2] * 0.3), 200))


def iter_dataset(n: int, seed: int, size: int = 512, cameras: tuple[str, ...] = ("desktop",),
                 referable_rate: float = 0.4) -> Iterator[SyntheticFundus]:
    """``n`` images; image i uses seed ``seed * 1_000_003 + i`` and camera ``cameras[i % len(cameras)]``."""
    for i in range(n):
        yield generate(seed * 1_000_003 + i, size=size, camera=cameras[i % len(cameras)],
                       referable_rate=referable_rate)


def camera_photo(seed: int, size: tuple[int, int] = (4000, 3000), quality: int = 95) -> bytes:
    """A synthetic fundus photograph at a handheld camera's resolution (12 MP by default) as JPEG bytes:
    the retina drawn at 1024 px, upscaled to the frame's height and centred on black, like a camera frame."""
    import io

    w, h = size
    img = generate(seed, size=1024).image.resize((h, h), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (w, h))
    canvas.paste(img, ((w - h) // 2, 0))
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def write_dataset(out_dir: str | Path, n: int, seed: int, size: int = 512, cameras: tuple[str, ...] = ("desktop",),
                  quality: int = 92, referable_rate: float = 0.4) -> Path:
    """Write ``n`` JPEGs and ``labels.csv`` (EyePACS layout: ``image,level``). Returns the CSV path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "labels.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(LABELS_HEADER)
        for i, item in enumerate(iter_dataset(n, seed, size, cameras, referable_rate)):
            name = f"synth_{seed}_{i:05d}.jpg"
            item.image.save(out / name, quality=quality)
            writer.writerow((name, item.grade))
    return csv_path
