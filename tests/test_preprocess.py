from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fundus_edge.datasets.synthetic import generate
from fundus_edge.errors import ImageError, UsageError
from fundus_edge.runtime.preprocess import PreprocessSpec, decode, detect_fov, normalize, preprocess

SPEC = PreprocessSpec(size=224)


def _jpeg(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, **kw)
    return buf.getvalue()


def test_real_photographs_field_of_view(real_photos: list[Path]) -> None:
    for p in real_photos:
        pre = preprocess(p, SPEC)
        w, h = pre.decoded_size
        fov = pre.fov
        assert fov.found, p.name
        # The retina is roughly centred and its diameter spans most of the wider side.
        assert abs(fov.cx - w / 2) < 0.05 * w and abs(fov.cy - h / 2) < 0.05 * h, (p.name, fov)
        assert 0.85 * max(w, h) / 2 < fov.radius < 1.05 * max(w, h) / 2, (p.name, fov)
        assert pre.tensor.shape == (1, 3, 224, 224) and pre.tensor.dtype == np.float32
        # A crop centred on the retina: the centre is bright, the square's corners are dark border.
        arr = np.asarray(pre.image, dtype=np.float32).max(axis=2)
        assert arr[100:124, 100:124].mean() > 3 * arr[:12, :12].mean() + 10, p.name


def test_hrf_clipped_circle_detected(real_photos: list[Path]) -> None:
    hrf = next(p for p in real_photos if p.name.endswith("_h.jpg"))
    fov = preprocess(hrf, SPEC).fov
    assert fov.clipped  # HRF circles run past the top and bottom edges


def test_draft_mode_decodes_at_reduced_scale() -> None:
    big = generate(3, size=1600).image  # 1600 px: 1/2 scale still covers 224/0.6 = 374 px... 1/4 gives 400
    data = _jpeg(big)
    img, original = decode(data, SPEC)
    assert original == (1600, 1600)
    assert img.size == (400, 400)
    no_draft = PreprocessSpec(size=224, draft=False)
    img2, _ = decode(data, no_draft)
    assert img2.size == (1600, 1600)
    a = preprocess(data, SPEC).tensor
    b = preprocess(data, no_draft).tensor
    assert np.abs(a - b).mean() < 0.05  # the same picture, whichever scale it was decoded at


def test_exif_orientation_applied() -> None:
    img = generate(5, size=320).image
    marked = img.copy()
    ImageDraw.Draw(marked).rectangle([0, 0, 60, 30], fill=(255, 255, 255))
    rotated = marked.transpose(Image.Transpose.ROTATE_270)  # stored rotated; EXIF 8 rotates it back
    exif = Image.Exif()
    exif[0x0112] = 8
    data = _jpeg(rotated, exif=exif.tobytes())
    out, _ = decode(data, PreprocessSpec(size=224, draft=False))
    assert out.size == marked.size
    top_left = np.asarray(out)[:20, :50].mean()
    assert top_left > 200  # the white mark is back in the top-left corner


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16", "LA"])
def test_pixel_modes_convert(mode: str) -> None:
    img = generate(7, size=256).image
    if mode == "I;16":
        arr = (np.asarray(img.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        conv = Image.fromarray(arr)
    else:
        conv = img.convert(mode)
    buf = io.BytesIO()
    conv.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
    pre = preprocess(buf.getvalue(), SPEC)
    assert pre.tensor.shape == (1, 3, 224, 224)
    assert pre.fov.found


def test_text_in_border_does_not_move_the_crop() -> None:
    img = generate(9, size=512).image
    clean = detect_fov(img, SPEC)
    marked = img.copy()
    d = ImageDraw.Draw(marked)
    d.rectangle([4, 4, 80, 20], fill=(255, 255, 255))  # burnt-in text block in the corner
    d.rectangle([470, 490, 508, 508], fill=(230, 230, 230))
    noisy = detect_fov(marked, SPEC)
    assert abs(noisy.cx - clean.cx) < 6 and abs(noisy.cy - clean.cy) < 6
    assert abs(noisy.radius - clean.radius) < 6


def test_rectangular_crop_of_fundus() -> None:
    img = generate(10, size=512).image
    band = img.crop((0, 96, 512, 416))  # circle cut at top and bottom
    fov = detect_fov(band, SPEC)
    assert fov.found and fov.clipped
    assert abs(fov.cy - 160) < 10 and abs(fov.cx - 256) < 10
    assert 220 < fov.radius < 260


def test_no_fundus_falls_back_to_centre_crop() -> None:
    black = Image.new("RGB", (300, 200))
    fov = detect_fov(black, SPEC)
    assert not fov.found and fov.radius == 100


def test_normalize_values_and_layouts() -> None:
    px = np.zeros((224, 224, 3), dtype=np.uint8)
    px[..., 0] = 255
    t = normalize(px, SPEC)
    expected_r = (1.0 - 0.485) / 0.229
    expected_g = (0.0 - 0.456) / 0.224
    assert t.shape == (1, 3, 224, 224)
    assert np.allclose(t[0, 0], expected_r, atol=1e-5) and np.allclose(t[0, 1], expected_g, atol=1e-5)
    nhwc = normalize(px, PreprocessSpec(size=224, layout="NHWC"))
    assert nhwc.shape == (1, 224, 224, 3)
    assert np.allclose(nhwc[0].transpose(2, 0, 1), t[0])
    buf = np.empty((1, 3, 224, 224), np.float32)
    assert normalize(px, SPEC, out=buf) is buf


def test_ben_graham_option_changes_input() -> None:
    data = _jpeg(generate(11, size=320).image)
    plain = preprocess(data, SPEC).tensor
    bg = preprocess(data, PreprocessSpec(size=224, ben_graham_sigma=1 / 30)).tensor
    assert bg.shape == plain.shape and not np.allclose(bg, plain)
    # local-average subtraction centres the retina near grey (128): mean close to (0.5 - mean) / std
    assert abs(float(bg[0, 0, 60:160, 60:160].mean()) - (128 / 255 - 0.485) / 0.229) < 0.5


def test_spec_round_trip_and_validation() -> None:
    spec = PreprocessSpec(size=256, ben_graham_sigma=0.03)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(UsageError, match="unknown preprocessing fields"):
        PreprocessSpec.from_dict({"size": 224, "colour": "blue"})
    with pytest.raises(UsageError):
        PreprocessSpec(size=8)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"", "empty-file"),
        (b"hello, I am a text file", "not-an-image"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "not-an-image"),  # JPEG magic, no decodable header
    ],
)
def test_bad_bytes_give_stable_codes(payload: bytes, code: str) -> None:
    with pytest.raises(ImageError) as exc:
        preprocess(payload, SPEC)
    assert exc.value.code == code


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = _jpeg(generate(12, size=512).image)
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError) as exc:
        preprocess(p, SPEC)
    assert exc.value.code == "decode-failed"


def test_missing_tiny_and_huge(tmp_path: Path) -> None:
    with pytest.raises(ImageError) as e1:
        preprocess(tmp_path / "nope.jpg", SPEC)
    assert e1.value.code == "not-found"
    with pytest.raises(ImageError) as e2:
        preprocess(_jpeg(Image.new("RGB", (20, 20))), SPEC)
    assert e2.value.code == "too-small"
    huge = io.BytesIO()
    Image.new("L", (12000, 9000)).save(huge, format="PNG")
    with pytest.raises(ImageError) as e3:
        preprocess(huge.getvalue(), PreprocessSpec(size=224, max_pixels=50_000_000))
    assert e3.value.code == "too-large"
