"""Dense preprocessing (runtime/dense.py, runtime/clahe.py) on real photographs from tests/data/open-fundus."""

from __future__ import annotations

import io
import itertools
import tracemalloc
from pathlib import Path

import cv2  # test-only: the reference CLAHE (opencv-python-headless, in the dev extra)
import numpy as np
import pytest
from PIL import Image

from fundus_edge.errors import UsageError
from fundus_edge.runtime.clahe import clahe
from fundus_edge.runtime.dense import (
    DensePreprocessSpec,
    _tile_origins,
    blend_weights,
    disc_mask,
    prepare,
    stitch,
    stitch_working,
    to_original,
)

DATA = Path(__file__).parent / "data" / "open-fundus"
CHASE = DATA / "chase_db1" / "images" / "Image_11L.jpg"
CHASE_MASK = DATA / "chase_db1" / "vessels_1st" / "Image_11L_1stHO.png"
HRF = DATA / "hrf" / "images" / "06_g.jpg"
HRF_MASK = DATA / "hrf" / "vessels" / "06_g.png"
HRF_FOV = DATA / "hrf" / "fov" / "06_g.png"


def _f1(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_spec_roundtrip_and_validation() -> None:
    spec = DensePreprocessSpec(fov_diameter=640, color="rgb", normalize="fixed", mean=(0.5, 0.4, 0.3),
                               std=(0.2, 0.2, 0.2), tile=128, overlap=16)
    assert DensePreprocessSpec.from_dict(spec.to_dict()) == spec
    assert spec.channels == 3
    with pytest.raises(UsageError, match="unknown dense preprocessing fields"):
        DensePreprocessSpec.from_dict({**spec.to_dict(), "sharpen": True})
    for bad in ({"color": "hsv"}, {"tile": 100}, {"tile": 64, "overlap": 32}, {"normalize": "fixed", "color": "rgb"},
                {"gamma": 0.0}, {"fov_diameter": 8}):
        with pytest.raises(UsageError):
            DensePreprocessSpec(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("photo", [CHASE, HRF])
@pytest.mark.parametrize("clip,tiles", [(2.0, 8), (1.0, 5), (4.0, 3), (0.0, 8)])
def test_clahe_matches_opencv_on_real_photos(photo: Path, clip: float, tiles: int) -> None:
    with Image.open(photo) as im:
        grey = np.asarray(im.convert("L"))
    for img in (grey, grey[:517, :701], np.ascontiguousarray(grey[::2, ::2])):  # divisible and not
        ours = clahe(img, clip, tiles)
        ref = cv2.createCLAHE(clipLimit=clip, tileGridSize=(tiles, tiles)).apply(img)
        assert np.array_equal(ours, ref), f"max diff {np.abs(ours.astype(int) - ref).max()}"


def test_prepare_scales_fov_and_tiles_with_fixed_shape() -> None:
    spec = DensePreprocessSpec(fov_diameter=512, tile=128, overlap=16)
    d = prepare(HRF, spec)
    g = d.geometry
    with Image.open(HRF) as photo:
        assert g.original_size == photo.size
    # HRF's FOV is ~1640 px across at 1752x1168: the working image is scaled so it is 512 px across
    assert g.fov.found and 1500 < 2 * g.fov.radius < 1760
    assert abs(2 * g.fov.radius * g.scale - 512) < 2
    assert d.tensors.shape[1:] == (1, 128, 128) and d.tensors.dtype == np.float32
    assert g.padded_size[0] % 16 == 0 and g.padded_size[1] % 16 == 0
    assert d.image.shape == (1, g.working_size[1], g.working_size[0])
    assert d.image.min() >= 0.0 and d.image.max() <= 1.0
    assert not d.image[0][~d.fov_mask].any()  # zero outside the FOV
    # the detected FOV agrees with HRF's expert FOV mask
    with Image.open(HRF_FOV) as fov_img:
        expert = np.asarray(fov_img.convert("L")) > 127
    assert _f1(g.original_fov_mask(), expert) > 0.97


@pytest.mark.parametrize("length,tile,overlap", [(100, 128, 16), (128, 128, 16), (300, 128, 16), (1040, 384, 32),
                                                 (513, 64, 8)])
def test_tile_origins_cover_with_overlap(length: int, tile: int, overlap: int) -> None:
    starts = _tile_origins(max(length, tile), tile, overlap)
    assert starts[0] == 0 and starts[-1] + tile == max(length, tile)
    assert all(b - a <= tile - overlap for a, b in itertools.pairwise(starts))


@pytest.mark.parametrize("color", ["grey", "green", "rgb"])
def test_stitch_of_identity_outputs_recovers_the_working_image(color: str) -> None:
    """Tiles passed through an identity 'network' and blended back give the working image exactly."""
    spec = DensePreprocessSpec(fov_diameter=400, color=color, tile=96, overlap=24)
    d = prepare(CHASE, spec)
    assert len(d.geometry.tiles) > 4
    back = stitch_working(d.tensors[:, :1], d.geometry, logits=False, overlap=spec.overlap)
    np.testing.assert_allclose(back, d.image[0], atol=1e-5)


def test_blend_weights_are_positive_and_flat_in_the_middle() -> None:
    w = blend_weights(64, 8)
    assert w.min() > 0 and w[8:56, 8:56].min() == 1.0 and w[0, 0] < w[4, 4] < 1.0


def test_masks_map_to_working_resolution_and_back() -> None:
    """An expert mask taken to the working resolution and back to the photo keeps its vessels."""
    with Image.open(CHASE_MASK) as im:
        mask = im.convert("L")
    gt = np.asarray(mask) > 127
    d = prepare(CHASE, DensePreprocessSpec(fov_diameter=768))
    work = np.asarray(d.geometry.to_working(mask, "bilinear"), np.float32) / 255.0
    assert work.shape == d.fov_mask.shape
    back = to_original(work, d.geometry) > 0.5
    fov = d.geometry.original_fov_mask()
    assert _f1(back & fov, gt & fov) > 0.95


def test_stitch_maps_to_original_pixels_through_draft_decoding() -> None:
    """A 2x-upscaled JPEG is draft-decoded at half size; outputs still come back at the full size."""
    with Image.open(CHASE) as im:
        big = im.resize((1998, 1920), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    spec = DensePreprocessSpec(fov_diameter=256, tile=128, overlap=16)
    d = prepare(buf.getvalue(), spec)
    assert d.geometry.original_size == (1998, 1920)
    ones = np.full((len(d.geometry.tiles), 1, 128, 128), 10.0, np.float32)  # logits -> p ~ 1
    prob = stitch(ones, d.geometry, logits=True, overlap=spec.overlap)
    assert prob.shape == (1920, 1998)
    fov = d.geometry.original_fov_mask()
    assert prob[~fov].max() == 0.0 and np.median(prob[fov]) > 0.99
    small = prepare(CHASE, spec)
    assert abs(d.geometry.fov.radius - 2 * small.geometry.fov.radius) < 0.03 * d.geometry.fov.radius


def test_whole_image_mode_and_bad_output_count() -> None:
    spec = DensePreprocessSpec(fov_diameter=256, tile=0, normalize="fov", gamma=0.8)
    d = prepare(CHASE, spec)
    assert d.tensors.shape[0] == 1 and d.tensors.shape[2] % 16 == 0 and d.tensors.shape[3] % 16 == 0
    inside = d.image[0][d.fov_mask]
    assert abs(inside.mean()) < 1e-3 and abs(inside.std() - 1) < 1e-3
    with pytest.raises(UsageError, match="tile outputs"):
        stitch(np.zeros((2, 1, 8, 8), np.float32), d.geometry)


@pytest.mark.parametrize("w,h,cx,cy,r", [(100, 80, 50.3, 40.7, 30.2), (50, 50, 0.0, 0.0, 20.0),
                                         (64, 64, 32.0, 32.0, 100.0), (10, 10, 5.0, 5.0, 0.4)])
def test_disc_mask_matches_the_circle_equation(w: int, h: int, cx: float, cy: float, r: float) -> None:
    yy, xx = np.ogrid[:h, :w]
    assert np.array_equal(disc_mask((w, h), cx, cy, r), ((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2) <= r * r)


def test_full_resolution_photo_stays_within_a_pi_zero_budget() -> None:
    """An HRF-sized 3504x2336 photo (8 MP): numpy's peak during prepare + stitch stays far below the ~350 MB a
    Pi Zero 2 W leaves free (devices/profiles/rpi-zero-2w.toml); tiles keep the network's input small too."""
    with Image.open(HRF) as im:
        big = im.resize((3504, 2336), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    del big
    spec = DensePreprocessSpec(fov_diameter=1024, tile=384, overlap=32)
    tracemalloc.start()
    try:
        d = prepare(data, spec)
        prob = stitch(np.zeros((len(d.geometry.tiles), 1, 384, 384), np.float32), d.geometry, overlap=32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert prob.shape == (2336, 3504)
    assert d.tensors.nbytes <= 8 * 384 * 384 * 4
    assert peak < 120 * 2**20, f"numpy peak {peak / 2**20:.0f} MB"
