"""Dense (per-pixel) preprocessing for segmentation models: the one implementation used by training,
evaluation and the device (numpy + pillow only).

prepare(photo): decode (reusing :mod:`.preprocess`) -> detect the field of view (the same detector as the
classifiers) -> crop the FOV's bounding box and scale it so the FOV diameter is ``fov_diameter`` px -> colour
mode (RGB, green, or grey) -> optional CLAHE and gamma -> optional normalisation -> pad to a multiple of what the
network needs -> tiles of a fixed size with overlap (bounded peak memory on the smallest device, and a fixed
input shape for exported models). stitch(tile outputs): blend overlapping tiles, undo padding, zero outside the
FOV and map back to the original photo's pixels.

Every parameter lives in :class:`DensePreprocessSpec`, stored with the model weights and in the bundle.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..errors import UsageError
from .preprocess import _RESAMPLE, FieldOfView, ImageSource, PreprocessSpec, decode, detect_fov

COLORS = ("rgb", "green", "grey")
NORMALIZE = ("none", "fixed", "fov")


@dataclass(frozen=True)
class DensePreprocessSpec:
    """Parameters of the dense preprocessing. Serialised as a dict with the weights and in the bundle manifest."""

    # Working resolution: the photo is scaled so the detected FOV is this many pixels across.
    fov_diameter: int = 1024
    # "rgb": 3 channels in [0, 1]; "green": the green channel; "grey": ITU-R 601 luma (classic vessel models).
    color: str = "grey"
    # Contrast-limited adaptive histogram equalisation on the 8-bit channel(s); OpenCV's algorithm.
    clahe: bool = True
    clahe_clip: float = 2.0
    clahe_tiles: int = 8
    # After scaling to [0, 1]: x ** gamma (gamma < 1 brightens dark vessels' surroundings).
    gamma: float = 1.0
    # "none": [0, 1] values; "fixed": (x - mean) / std; "fov": per-image zero mean, unit std inside the FOV.
    normalize: str = "none"
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.25,)
    # The network's input sides must be multiples of this (2 ** number of down-samplings).
    multiple: int = 16
    # Tile side (a multiple of `multiple`); 0 = one tensor of the whole (padded) image.
    tile: int = 256
    overlap: int = 32
    resample: str = "bilinear"
    # Shrinks the detected FOV circle (fraction of the radius) for the mask, to keep the rim's glare out.
    fov_margin: float = 0.0
    # FOV detection and decoding, as in PreprocessSpec.
    fov_threshold: float = 0.12
    proxy_size: int = 160
    draft: bool = True
    max_pixels: int = 80_000_000
    min_side: int = 32

    def __post_init__(self) -> None:
        if not 32 <= self.fov_diameter <= 8192:
            raise UsageError(f"fov_diameter must be 32..8192 px, got {self.fov_diameter}")
        if self.color not in COLORS:
            raise UsageError(f"color must be one of {COLORS}, got {self.color!r}")
        if self.normalize not in NORMALIZE:
            raise UsageError(f"normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        if self.normalize == "fixed" and (len(self.mean) != self.channels or len(self.std) != self.channels
                                          or min(self.std) <= 0):
            raise UsageError(f"normalize='fixed' needs {self.channels} mean and std values, std > 0")
        if self.clahe_clip < 0 or not 1 <= self.clahe_tiles <= 64:
            raise UsageError("clahe_clip must be >= 0 and clahe_tiles 1..64")
        if self.gamma <= 0:
            raise UsageError(f"gamma must be > 0, got {self.gamma}")
        if self.multiple < 1 or (self.tile and (self.tile % self.multiple or self.tile < self.multiple)):
            raise UsageError(f"tile ({self.tile}) must be 0 or a positive multiple of multiple ({self.multiple})")
        if self.tile and not 0 <= self.overlap < self.tile // 2:
            raise UsageError(f"overlap must be 0..tile/2 - 1, got {self.overlap} for tile {self.tile}")
        if self.resample not in _RESAMPLE:
            raise UsageError(f"resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if not 0.0 <= self.fov_margin < 0.5:
            raise UsageError(f"fov_margin must be in [0, 0.5), got {self.fov_margin}")

    @property
    def channels(self) -> int:
        return 3 if self.color == "rgb" else 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DensePreprocessSpec:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"unknown dense preprocessing fields {sorted(unknown)}; this kit knows {sorted(known)}")
        kw = dict(data)
        for key in ("mean", "std"):
            if key in kw:
                kw[key] = tuple(float(v) for v in kw[key])
        return cls(**kw)

    def decode_spec(self) -> PreprocessSpec:
        """The classifier spec whose decoder and FOV detector this reuses (draft decoding covers the FOV)."""
        return PreprocessSpec(size=min(self.fov_diameter, 4096), fov_threshold=self.fov_threshold,
                              proxy_size=self.proxy_size, draft=self.draft, max_pixels=self.max_pixels,
                              min_side=self.min_side)


def disc_mask(size: tuple[int, int], cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean (h, w) mask of the pixels whose centres lie in the disc, filled row by row (no full-size
    float temporaries: a 12 MP photo costs its 12 MB of booleans only)."""
    w, h = size
    mask = np.zeros((h, w), bool)
    dy = np.arange(h, dtype=np.float64) + 0.5 - cy
    half = np.sqrt(np.maximum(r * r - dy * dy, 0.0))
    x0 = np.clip(np.ceil(cx - half - 0.5), 0, w).astype(np.int64)
    x1 = np.clip(np.floor(cx + half - 0.5) + 1, 0, w).astype(np.int64)
    for y in np.flatnonzero((dy * dy <= r * r) & (x1 > x0)):
        mask[y, x0[y]:x1[y]] = True
    return mask


@dataclass(frozen=True)
class DenseGeometry:
    """How the working image relates to the original photo, to map network outputs back onto it."""

    original_size: tuple[int, int]  # (w, h) of the photo at full resolution, EXIF-oriented
    box: tuple[float, float, float, float]  # the cropped region, original-photo pixels (x0, y0, x1, y1)
    working_size: tuple[int, int]  # (w, h) of the box after scaling
    padded_size: tuple[int, int]  # (w, h) after padding to `multiple` (and to at least one tile)
    tiles: tuple[tuple[int, int], ...]  # top-left (x, y) of each tile in the padded image
    tile: int  # tile side; 0 = a single tensor of padded_size
    fov: FieldOfView  # in original-photo pixels
    fov_margin: float = 0.0

    @property
    def scale(self) -> float:
        """Working pixels per original pixel."""
        return self.working_size[0] / max(self.box[2] - self.box[0], 1e-9)

    def working_fov_mask(self) -> np.ndarray:
        """Boolean (h, w) FOV mask at the working resolution (the detected circle inside the photo)."""
        s = self.scale
        return disc_mask(self.working_size, (self.fov.cx - self.box[0]) * s, (self.fov.cy - self.box[1]) * s,
                         self.fov.radius * s * (1.0 - self.fov_margin))

    def original_fov_mask(self) -> np.ndarray:
        """Boolean (h, w) FOV mask in original-photo pixels."""
        return disc_mask(self.original_size, self.fov.cx, self.fov.cy, self.fov.radius * (1.0 - self.fov_margin))

    def to_working(self, img: Image.Image, resample: str = "bilinear") -> Image.Image:
        """An image aligned with the photo (a mask, a label map) cropped and scaled like the working image."""
        fx, fy = img.size[0] / self.original_size[0], img.size[1] / self.original_size[1]
        x0, y0, x1, y1 = self.box
        return img.resize(self.working_size, _RESAMPLE[resample], box=(x0 * fx, y0 * fy, x1 * fx, y1 * fy))


@dataclass
class DenseInput:
    """What :func:`prepare` returns: the network input(s), the working image and the geometry."""

    tensors: np.ndarray  # (T, C, tile, tile) float32, or (1, C, H, W) when spec.tile == 0
    image: np.ndarray  # (C, h, w) float32: the working image before padding (for training and previews)
    fov_mask: np.ndarray  # (h, w) bool at the working resolution
    geometry: DenseGeometry


def _full_size(decoded: tuple[int, int], original: tuple[int, int]) -> tuple[int, int]:
    """The photo's full-resolution size in the decoded (EXIF-oriented) frame: draft decoding shrinks it,
    EXIF rotation may swap its sides."""
    ow, oh = original
    if (decoded[0] >= decoded[1]) != (ow >= oh) and ow != oh:
        ow, oh = oh, ow
    return ow, oh


def _crop_box(fov: FieldOfView, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The FOV's bounding square clipped to the image, on whole pixels."""
    w, h = size
    x0, y0 = max(0, math.floor(fov.cx - fov.radius)), max(0, math.floor(fov.cy - fov.radius))
    x1, y1 = min(w, math.ceil(fov.cx + fov.radius)), min(h, math.ceil(fov.cy + fov.radius))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return 0, 0, w, h
    return x0, y0, x1, y1


def _to_channels(img: Image.Image, spec: DensePreprocessSpec) -> np.ndarray:
    """(C, h, w) uint8 in the spec's colour mode."""
    if spec.color == "rgb":
        return np.ascontiguousarray(np.asarray(img).transpose(2, 0, 1))
    if spec.color == "green":
        return np.asarray(img.getchannel("G"))[None]
    return np.asarray(img.convert("L"))[None]  # L = R * 299/1000 + G * 587/1000 + B * 114/1000


def _tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Tile starts covering [0, length) with at least `overlap` pixels shared between neighbours."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def _padded(size: int, spec: DensePreprocessSpec) -> int:
    p = math.ceil(size / spec.multiple) * spec.multiple
    return max(p, spec.tile) if spec.tile else p


def enhance(channels: np.ndarray, fov: np.ndarray, spec: DensePreprocessSpec) -> np.ndarray:
    """(C, h, w) uint8 -> (C, h, w) float32: CLAHE, [0, 1], gamma, normalisation; zero outside the FOV."""
    from .clahe import clahe

    if spec.clahe:
        channels = np.stack([clahe(c, spec.clahe_clip, spec.clahe_tiles) for c in channels])
    x = channels.astype(np.float32) * np.float32(1.0 / 255.0)
    if spec.gamma != 1.0:
        np.power(x, np.float32(spec.gamma), out=x)
    if spec.normalize == "fixed":
        x -= np.asarray(spec.mean, np.float32)[:, None, None]
        x /= np.asarray(spec.std, np.float32)[:, None, None]
    elif spec.normalize == "fov" and fov.any():
        inside = x[:, fov]
        x -= inside.mean(axis=1)[:, None, None]
        x /= np.maximum(inside.std(axis=1), 1e-6)[:, None, None]
    x[:, ~fov] = 0.0
    return x


def prepare(source: ImageSource, spec: DensePreprocessSpec) -> DenseInput:
    """Decode and preprocess one photo into network input tile(s) plus the geometry to map outputs back.

    Raises :class:`ImageError` for images that cannot be read (as :func:`.preprocess.decode` does)."""
    dspec = spec.decode_spec()
    img, original = decode(source, dspec)
    full = _full_size(img.size, original)
    fx, fy = full[0] / img.size[0], full[1] / img.size[1]
    fov_dec = detect_fov(img, dspec)
    bx0, by0, bx1, by1 = _crop_box(fov_dec, img.size)
    scale = spec.fov_diameter / max(2.0 * fov_dec.radius, 1.0)
    work = (max(1, round((bx1 - bx0) * scale)), max(1, round((by1 - by0) * scale)))
    crop = img.resize(work, _RESAMPLE[spec.resample], box=(bx0, by0, bx1, by1))
    fov = FieldOfView(cx=fov_dec.cx * fx, cy=fov_dec.cy * fy, radius=fov_dec.radius * max(fx, fy),
                      found=fov_dec.found, coverage=fov_dec.coverage, clipped=fov_dec.clipped)
    pw, ph = _padded(work[0], spec), _padded(work[1], spec)
    if spec.tile:
        origins = tuple((x, y) for y in _tile_origins(ph, spec.tile, spec.overlap)
                        for x in _tile_origins(pw, spec.tile, spec.overlap))
    else:
        origins = ((0, 0),)
    geometry = DenseGeometry(original_size=full, box=(bx0 * fx, by0 * fy, bx1 * fx, by1 * fy), working_size=work,
                             padded_size=(pw, ph), tiles=origins, tile=spec.tile, fov=fov,
                             fov_margin=spec.fov_margin)
    mask = geometry.working_fov_mask()
    image = enhance(_to_channels(crop, spec), mask, spec)
    return DenseInput(tensors=tile_image(image, geometry), image=image, fov_mask=mask, geometry=geometry)


def tile_image(image: np.ndarray, geometry: DenseGeometry) -> np.ndarray:
    """(C, h, w) working image -> zero-padded (T, C, t, t) tiles at ``geometry.tiles`` (or (1, C, H, W))."""
    c, h, w = image.shape
    pw, ph = geometry.padded_size
    t = geometry.tile
    if not t:
        out = np.zeros((1, c, ph, pw), np.float32)
        out[0, :, :h, :w] = image
        return out
    out = np.zeros((len(geometry.tiles), c, t, t), np.float32)
    for i, (x, y) in enumerate(geometry.tiles):
        part = image[:, y:y + t, x:x + t]
        out[i, :, :part.shape[1], :part.shape[2]] = part
    return out


def blend_weights(tile: int, overlap: int) -> np.ndarray:
    """(t, t) float32 weights: 1 in the middle, a linear ramp over the overlap band, never 0."""
    ramp = np.ones(tile, np.float32)
    if overlap:
        edge = (np.arange(overlap, dtype=np.float32) + 1.0) / (overlap + 1.0)
        ramp[:overlap] = edge
        ramp[-overlap:] = edge[::-1]
    return np.outer(ramp, ramp)


def sigmoid(x: np.ndarray) -> np.ndarray:
    out = np.exp(-np.abs(x, dtype=np.float32))
    return np.where(x >= 0, 1.0 / (1.0 + out), out / (1.0 + out)).astype(np.float32)


def stitch_working(outputs: np.ndarray, geometry: DenseGeometry, logits: bool = True,
                   overlap: int = 0) -> np.ndarray:
    """Tile outputs (T, 1, t, t) or (T, t, t) -> (h, w) float32 probabilities at the working resolution,
    overlapping tiles blended with :func:`blend_weights`, zero outside the FOV."""
    out = np.asarray(outputs, np.float32)
    if out.ndim == 4:
        out = out[:, 0]
    if out.shape[0] != len(geometry.tiles):
        raise UsageError(f"got {out.shape[0]} tile outputs for {len(geometry.tiles)} tiles")
    w, h = geometry.working_size
    pw, ph = geometry.padded_size
    probs = sigmoid(out) if logits else out
    if not geometry.tile:
        full = probs[0]
    else:
        t = geometry.tile
        acc = np.zeros((ph, pw), np.float32)
        norm = np.zeros((ph, pw), np.float32)
        wt = blend_weights(t, overlap)
        for p, (x, y) in zip(probs, geometry.tiles, strict=True):
            acc[y:y + t, x:x + t] += p * wt
            norm[y:y + t, x:x + t] += wt
        full = acc / np.maximum(norm, 1e-12)
    result = np.ascontiguousarray(full[:h, :w])
    result[~geometry.working_fov_mask()] = 0.0
    return result


def stitch(outputs: np.ndarray, geometry: DenseGeometry, logits: bool = True, overlap: int = 0) -> np.ndarray:
    """Tile outputs -> (H, W) float32 vessel probability map in the original photo's pixels (0 outside the
    FOV). ``overlap``: the spec's overlap (blending ramp width); ``logits``: outputs are pre-sigmoid."""
    work = stitch_working(outputs, geometry, logits=logits, overlap=overlap)
    return to_original(work, geometry)


def to_original(work: np.ndarray, geometry: DenseGeometry) -> np.ndarray:
    """A (h, w) float map at the working resolution -> the original photo's pixels (bilinear; 0 outside)."""
    w, h = geometry.original_size
    x0, y0, x1, y1 = geometry.box
    ix0, iy0, ix1, iy1 = round(x0), round(y0), round(x1), round(y1)
    canvas = np.zeros((h, w), np.float32)
    if ix1 <= ix0 or iy1 <= iy0:
        return canvas
    sx, sy = work.shape[1] / (x1 - x0), work.shape[0] / (y1 - y0)
    src = Image.fromarray(np.ascontiguousarray(work, dtype=np.float32), "F")
    box = ((ix0 - x0) * sx, (iy0 - y0) * sy, (ix1 - x0) * sx, (iy1 - y0) * sy)
    canvas[iy0:iy1, ix0:ix1] = np.asarray(src.resize((ix1 - ix0, iy1 - iy0), Image.Resampling.BILINEAR, box=box))
    np.multiply(canvas, geometry.original_fov_mask(), out=canvas)  # zero outside the FOV, no inverted copy
    return canvas
