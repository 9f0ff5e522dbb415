"""DICOM input (reader side): fundus photographs from clinic cameras, built here with pydicom from a real CC0 HRF
photograph (tests/data/fundus/01_h.jpg; see its PROVENANCE.md)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from fundus_edge.errors import DicomError, ImageError, MissingDependencyError
from fundus_edge.runtime.dicom import decode_dicom, is_dicom
from fundus_edge.runtime.preprocess import PreprocessSpec, preprocess

PHOTO = Path(__file__).parent / "data" / "fundus" / "01_h.jpg"
OP_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
OCT = "1.2.840.10008.5.1.4.1.1.77.1.5.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    with Image.open(PHOTO) as im:
        return np.asarray(im.convert("RGB").resize((320, 214)))  # even width: YBR_FULL_422 pairs pixels


def _dataset(sop_class: str, syntax: str = ExplicitVRLittleEndian, modality: str = "OP") -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"
    ds.Modality = modality
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-0042"
    ds.PatientBirthDate = "19600101"
    ds.Laterality = "R"
    ds.ImageLaterality = "R"
    ds.Manufacturer = "Acme Optics"
    ds.ManufacturerModelName = "Handheld 2"
    return ds


def _image(ds: Dataset, rows: int, cols: int, photometric: str, pixel_data: bytes, samples: int = 3,
           frames: int = 1, planar: int = 0) -> bytes:
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples == 3:
        ds.PlanarConfiguration = planar
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixel_data
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=95, subsampling="4:2:2")
    return buf.getvalue()


def test_uncompressed_rgb_and_safe_metadata(photo: np.ndarray, tmp_path: Path) -> None:
    h, w, _ = photo.shape
    data = _image(_dataset(OP_8BIT), h, w, "RGB", photo.tobytes())
    assert is_dicom(data)
    img, meta = decode_dicom(data)
    assert img.mode == "RGB" and np.array_equal(np.asarray(img), photo)
    d = meta.to_dict()
    assert d["sop_class"] == "Ophthalmic Photography 8 Bit Image Storage" and d["modality"] == "OP"
    assert d["study_instance_uid"] == "1.2.826.0.1.3680043.8.498.1" and d["eye"] == "R"
    assert (d["laterality"], d["image_laterality"], d["frames"], d["note"]) == ("R", "R", 1, None)
    assert d["manufacturer"] == "Acme Optics" and (d["rows"], d["columns"]) == (h, w)
    text = json.dumps(d) + repr(meta)
    assert "Doe" not in text and "Jane" not in text and "19600101" not in text  # never the name or birth date
    assert "patient_id" not in d and "MRN-0042" not in json.dumps(d)
    assert meta.patient_id == "MRN-0042"  # a separate field, for a caller allowed to store it
    path = tmp_path / "IM0001"  # cameras often write files without an extension
    path.write_bytes(data)
    assert is_dicom(path) and not is_dicom(PHOTO) and not is_dicom(tmp_path / "missing") and not is_dicom(b"DICM")


def test_planar_rgb_and_ybr_full(photo: np.ndarray) -> None:
    h, w, _ = photo.shape
    planar = _image(_dataset(OP_8BIT), h, w, "RGB", photo.transpose(2, 0, 1).tobytes(), planar=1)
    assert np.array_equal(np.asarray(decode_dicom(planar)[0]), photo)
    ybr = np.asarray(Image.fromarray(photo).convert("YCbCr"))
    img, meta = decode_dicom(_image(_dataset(OP_8BIT), h, w, "YBR_FULL", ybr.tobytes()))
    assert meta.photometric == "YBR_FULL"
    assert np.abs(np.asarray(img).astype(int) - photo).max() <= 3  # YCbCr rounding only


def test_uncompressed_ybr_full_422(photo: np.ndarray) -> None:
    h, w, _ = photo.shape
    ybr = np.asarray(Image.fromarray(photo).convert("YCbCr")).astype(np.int32)
    pairs = ybr.reshape(h, w // 2, 2, 3)
    chroma = (pairs[..., 1:].sum(axis=2) + 1) // 2  # one Cb, Cr per pair of pixels
    quad = np.concatenate([pairs[..., 0], chroma], axis=-1).astype(np.uint8)  # Y0 Y1 Cb Cr
    img, _ = decode_dicom(_image(_dataset(OP_8BIT), h, w, "YBR_FULL_422", quad.tobytes()))
    diff = np.abs(np.asarray(img).astype(int) - photo)
    assert diff.mean() < 2.0
    assert np.corrcoef(np.asarray(img)[..., 0].ravel(), photo[..., 0].ravel())[0, 1] > 0.99


def test_jpeg_baseline_encapsulated_single_and_multi_frame(photo: np.ndarray) -> None:
    h, w, _ = photo.shape
    jpeg = _jpeg(photo)
    with Image.open(io.BytesIO(jpeg)) as im:
        want = np.asarray(im.convert("RGB"))
    ds = _dataset(OP_8BIT, JPEGBaseline8Bit)
    img, meta = decode_dicom(_image(ds, h, w, "YBR_FULL_422", encapsulate([jpeg])))
    assert np.array_equal(np.asarray(img), want)  # exactly what Pillow decodes from the frame
    assert np.abs(np.asarray(img).astype(int) - photo).mean() < 3.0
    assert meta.transfer_syntax == JPEGBaseline8Bit and meta.frames == 1
    second = _jpeg(255 - photo)
    img3, meta3 = decode_dicom(_image(_dataset(OP_8BIT, JPEGBaseline8Bit), h, w, "YBR_FULL_422",
                                      encapsulate([jpeg, second, second]), frames=3))
    assert np.array_equal(np.asarray(img3), want)
    assert (meta3.frames, meta3.frame_used) == (3, 0) and meta3.note == "multi-frame file (3 frames): frame 0 used"


def test_uncompressed_multi_frame_takes_frame_0(photo: np.ndarray) -> None:
    h, w, _ = photo.shape
    frames = np.stack([photo, 255 - photo, photo // 2])
    img, meta = decode_dicom(_image(_dataset(OP_8BIT), h, w, "RGB", frames.tobytes(), frames=3))
    assert np.array_equal(np.asarray(img), photo) and meta.to_dict()["note"].startswith("multi-frame file (3")


def test_red_free_monochrome(photo: np.ndarray) -> None:
    h, w, _ = photo.shape
    green = np.ascontiguousarray(photo[..., 1])
    img, _ = decode_dicom(_image(_dataset(OP_8BIT), h, w, "MONOCHROME2", green.tobytes(), samples=1))
    arr = np.asarray(img)
    assert img.mode == "RGB" and np.array_equal(arr[..., 0], green) and np.array_equal(arr[..., 2], green)


def test_a_structured_report_is_refused() -> None:
    ds = _dataset(BASIC_TEXT_SR, modality="SR")
    ds.ValueType = "CONTAINER"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    with pytest.raises(DicomError) as exc:
        decode_dicom(buf.getvalue())
    err: Any = exc.value
    assert isinstance(err, ImageError) and err.exit_code == 10
    assert (err.code, err.reason, err.sop_class_uid) == ("not-an-image", "no-pixel-data", BASIC_TEXT_SR)
    assert "Basic Text SR Storage" in str(err) and "not a photograph" in str(err)


def test_an_oct_volume_is_refused() -> None:
    frames = np.random.default_rng(0).integers(0, 255, (16, 64, 48), dtype=np.uint8)
    data = _image(_dataset(OCT, modality="OPT"), 64, 48, "MONOCHROME2", frames.tobytes(), samples=1, frames=16)
    with pytest.raises(DicomError) as exc:
        decode_dicom(data)
    assert (exc.value.code, exc.value.reason) == ("not-an-image", "not-a-photograph")
    assert "OCT volume" in str(exc.value) and "OPT" in str(exc.value)


def test_damaged_and_foreign_files(photo: np.ndarray) -> None:
    with pytest.raises(DicomError) as exc:
        decode_dicom(PHOTO.read_bytes())
    assert (exc.value.code, exc.value.reason) == ("not-an-image", "not-dicom")
    h, w, _ = photo.shape
    data = _image(_dataset(OP_8BIT), h, w, "RGB", photo.tobytes())
    with pytest.raises(DicomError) as cut:
        decode_dicom(data[: len(data) // 2])
    assert cut.value.code == "decode-failed"
    with pytest.raises(DicomError) as big:
        decode_dicom(data, max_pixels=1000)
    assert big.value.code == "too-large"
    palette = _image(_dataset(OP_8BIT), h, w, "PALETTE COLOR", photo[..., 0].tobytes(), samples=1)
    with pytest.raises(DicomError) as pal:
        decode_dicom(palette)
    assert (pal.value.code, pal.value.reason) == ("unsupported-mode", "photometric")


def test_the_decoded_photo_goes_through_the_runtime_preprocessing(photo: np.ndarray) -> None:
    """The hook: decode_dicom's image is what runtime preprocessing takes, and gives what the JPEG would."""
    h, w, _ = photo.shape
    img, _ = decode_dicom(_image(_dataset(OP_8BIT), h, w, "RGB", photo.tobytes()))
    spec = PreprocessSpec(size=128)
    got = preprocess(img, spec).tensor
    want = preprocess(Image.fromarray(photo), spec).tensor
    assert got.shape == (1, 3, 128, 128) and np.array_equal(got, want)


def test_without_pydicom_the_extra_is_named(monkeypatch: pytest.MonkeyPatch, photo: np.ndarray) -> None:
    h, w, _ = photo.shape
    data = _image(_dataset(OP_8BIT), h, w, "RGB", photo.tobytes())
    monkeypatch.setitem(sys.modules, "pydicom", None)
    assert is_dicom(data)  # needs no pydicom
    with pytest.raises(MissingDependencyError, match=r"fundus-edge\[dicom\]"):
        decode_dicom(data)


def test_screen_a_dicom_study_returns_a_decision(built: Any, real_photos: list[Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`fundus-edge screen --bundle B study.dcm --json` returns a decision (JPEG-encapsulated, as cameras write);
    the patient's name never reaches the output."""
    from fundus_edge.cli import main

    with Image.open(real_photos[0]) as im:
        rgb = np.asarray(im.convert("RGB"))
    rgb = rgb[: rgb.shape[0] // 2 * 2, : rgb.shape[1] // 2 * 2]
    h, w, _ = rgb.shape
    study = tmp_path / "study.dcm"
    study.write_bytes(_image(_dataset(OP_8BIT, JPEGBaseline8Bit), h, w, "YBR_FULL_422", encapsulate([_jpeg(rgb)])))
    code = main(["screen", "--bundle", str(built.out), str(study), "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    result = json.loads(out)["results"][0]
    assert result["decision"] in ("refer", "no-refer", "ungradable") and not result.get("error")
    assert "Doe" not in out
