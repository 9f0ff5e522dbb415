"""DICOM input, reader side: a fundus photograph from a clinic camera's DICOM file, as a PIL image.

Reads Ophthalmic Photography / VL Photographic / Secondary Capture images: 8-bit RGB, YBR_FULL, YBR_FULL_422
or MONOCHROME (red-free), uncompressed or encapsulated JPEG (baseline/extended; JPEG 2000 where Pillow has
OpenJPEG), decoded with Pillow and numpy (no pylibjpeg, no GDCM). A multi-frame file gives its first frame and
says so (``DicomMeta.frames``, ``frame_used``). Anything that is not a photograph (a structured report, an OCT
volume, a CT slice) is refused with :class:`~fundus_edge.errors.DicomError`, per file.

Metadata: only what a screening result needs to be filed back (study/series/instance UIDs, SOP class, modality,
laterality, the camera's make and model). The patient's name, birth date and other demographics are never read
into it; the patient ID is a separate field (``DicomMeta.patient_id``) that ``to_dict()`` leaves out, for a
caller that is allowed to store it.

Needs ``pydicom`` (``pip install 'fundus-edge[dicom]'``); numpy + Pillow otherwise, like the rest of the runtime.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image

from ..errors import DicomError, MissingDependencyError

PREAMBLE = 128
MAGIC = b"DICM"

# SOP classes that hold a photograph of the retina (or may: Secondary Capture is how many cameras export)
PHOTO_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": "Ophthalmic Photography 8 Bit Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": "Ophthalmic Photography 16 Bit Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.4": "VL Photographic Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.5.5": "Wide Field Ophthalmic Photography Stereographic Projection Image Storage",
    "1.2.840.10008.5.1.4.1.1.77.1.5.6": "Wide Field Ophthalmic Photography 3D Coordinates Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
}
NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian
JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50": "JPEG Baseline", "1.2.840.10008.1.2.4.51": "JPEG Extended",
                 "1.2.840.10008.1.2.4.90": "JPEG 2000 (lossless)", "1.2.840.10008.1.2.4.91": "JPEG 2000"}
COLOR = {"RGB", "YBR_FULL", "YBR_FULL_422"}
MONO = {"MONOCHROME1", "MONOCHROME2"}


@dataclass(frozen=True)
class DicomMeta:
    """What the file says about the image, without demographics. ``patient_id`` is left out of ``to_dict``."""

    sop_class_uid: str
    sop_class: str
    modality: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    sop_instance_uid: str | None
    laterality: str | None  # (0020,0060) of the series: R | L
    image_laterality: str | None  # (0020,0062) of the image: R | L | U | B
    photometric: str
    transfer_syntax: str
    rows: int
    columns: int
    frames: int
    frame_used: int
    manufacturer: str | None
    model: str | None
    patient_id: str | None = None

    @property
    def eye(self) -> str | None:
        """The imaged eye, R or L, from the image laterality, else the series laterality."""
        for value in (self.image_laterality, self.laterality):
            if value in ("R", "L"):
                return value
        return None

    @property
    def note(self) -> str | None:
        return f"multi-frame file ({self.frames} frames): frame {self.frame_used} used" if self.frames > 1 else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["patient_id"]
        d["eye"] = self.eye
        d["note"] = self.note
        return d


def is_dicom(source: str | os.PathLike[str] | bytes) -> bool:
    """True when ``source`` (a path or the file's bytes) starts with the 128-byte preamble and ``DICM``."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source[PREAMBLE : PREAMBLE + 4]) == MAGIC
    try:
        with open(source, "rb") as fh:
            fh.seek(PREAMBLE)
            return fh.read(4) == MAGIC
    except OSError:
        return False


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as exc:
        raise MissingDependencyError("pydicom", "dicom", "Reading DICOM images") from exc
    return pydicom


def _text(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value).strip() or None if value is not None else None


def _refuse_non_photo(ds: Any, sop_class_uid: str, sop_class: str) -> None:
    modality = _text(ds, "Modality")
    if "PixelData" not in ds:
        raise DicomError("not-an-image", f"the DICOM file is a {sop_class} ({modality or 'no modality'}) with no "
                         "pixel data, not a photograph", "no-pixel-data", sop_class_uid)
    if sop_class_uid not in PHOTO_SOP_CLASSES:
        what = "an OCT volume" if modality == "OPT" or "Tomography" in sop_class else f"a {sop_class}"
        raise DicomError("not-an-image", f"the DICOM file is {what} (modality {modality or 'unknown'}), not a fundus "
                         "photograph; export the colour fundus photo from the camera", "not-a-photograph",
                         sop_class_uid)


def _meta(ds: Any, sop_class_uid: str, sop_class: str, syntax: str, frames: int) -> DicomMeta:
    return DicomMeta(
        sop_class_uid=sop_class_uid, sop_class=sop_class, modality=_text(ds, "Modality"),
        study_instance_uid=_text(ds, "StudyInstanceUID"), series_instance_uid=_text(ds, "SeriesInstanceUID"),
        sop_instance_uid=_text(ds, "SOPInstanceUID"), laterality=_text(ds, "Laterality"),
        image_laterality=_text(ds, "ImageLaterality"), photometric=str(ds.get("PhotometricInterpretation", "")),
        transfer_syntax=syntax, rows=int(ds.Rows), columns=int(ds.Columns), frames=frames, frame_used=0,
        manufacturer=_text(ds, "Manufacturer"), model=_text(ds, "ManufacturerModelName"),
        patient_id=_text(ds, "PatientID"),
    )


def _check_pixels(ds: Any, syntax: str, max_pixels: int) -> None:
    photometric = str(ds.get("PhotometricInterpretation", ""))
    samples, bits = int(ds.get("SamplesPerPixel", 1)), int(ds.get("BitsAllocated", 0))
    if photometric not in COLOR | MONO or (photometric in COLOR) != (samples == 3):
        raise DicomError("unsupported-mode", f"DICOM photometric interpretation {photometric!r} with {samples} "
                         "sample(s) per pixel is not supported (RGB, YBR_FULL, YBR_FULL_422, MONOCHROME are)",
                         "photometric", str(ds.get("SOPClassUID", "")))
    if bits != 8 and syntax in NATIVE_SYNTAXES:
        raise DicomError("unsupported-mode", f"DICOM image has {bits} bits per sample; fundus photographs are read "
                         "at 8 bits", "bit-depth", str(ds.get("SOPClassUID", "")))
    if syntax not in NATIVE_SYNTAXES and syntax not in JPEG_SYNTAXES:
        raise DicomError("unsupported-mode", f"DICOM transfer syntax {syntax} is not supported: export the image "
                         "uncompressed or as JPEG baseline", "transfer-syntax", str(ds.get("SOPClassUID", "")))
    if int(ds.Rows) * int(ds.Columns) > max_pixels:
        raise DicomError("too-large", f"DICOM image is {ds.Columns}x{ds.Rows}, over {max_pixels / 1e6:.0f} MP",
                         "too-large", str(ds.get("SOPClassUID", "")))


def _native_frame(ds: Any) -> Image.Image:
    """Frame 0 of uncompressed 8-bit pixel data."""
    rows, cols, samples = int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel", 1))
    photometric = str(ds.PhotometricInterpretation)
    raw = np.frombuffer(ds.PixelData, np.uint8)
    if photometric == "YBR_FULL_422":  # Y0 Y1 Cb Cr for each pair of pixels (PS3.5 8.2.1)
        need = rows * cols * 2
        if raw.size < need or cols % 2:
            raise DicomError("decode-failed", "YBR_FULL_422 pixel data is short or has an odd width",
                             "pixel-data", str(ds.SOPClassUID))
        quad = raw[:need].reshape(rows, cols // 2, 4)
        y = quad[..., :2].reshape(rows, cols)
        cb, cr = (np.repeat(quad[..., k], 2, axis=1) for k in (2, 3))
        return Image.fromarray(np.stack([y, cb, cr], axis=-1), "YCbCr").convert("RGB")
    need = rows * cols * samples
    if raw.size < need:
        raise DicomError("decode-failed", f"pixel data holds {raw.size} bytes, a frame needs {need}",
                         "pixel-data", str(ds.SOPClassUID))
    frame = raw[:need]
    if samples == 1:
        grey = frame.reshape(rows, cols)
        return Image.fromarray(255 - grey if photometric == "MONOCHROME1" else grey, "L").convert("RGB")
    planar = int(ds.get("PlanarConfiguration", 0))
    pixels = frame.reshape(3, rows, cols).transpose(1, 2, 0) if planar else frame.reshape(rows, cols, 3)
    mode = "YCbCr" if photometric == "YBR_FULL" else "RGB"
    return Image.fromarray(np.ascontiguousarray(pixels), mode).convert("RGB")


def _encapsulated_frame(ds: Any, frames: int) -> Image.Image:
    """Frame 0 of encapsulated JPEG data, decoded by Pillow (which applies the JPEG's own YCbCr->RGB)."""
    from pydicom.encaps import generate_frames

    first = next(iter(generate_frames(ds.PixelData, number_of_frames=frames)), None)
    if not first:
        raise DicomError("decode-failed", "the encapsulated pixel data holds no frame", "pixel-data",
                         str(ds.SOPClassUID))
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(first))
        img.load()
    if img.size != (int(ds.Columns), int(ds.Rows)):
        raise DicomError("decode-failed", f"the JPEG frame is {img.size[0]}x{img.size[1]}, the header says "
                         f"{ds.Columns}x{ds.Rows}", "pixel-data", str(ds.SOPClassUID))
    return img.convert("RGB")


def decode_dicom(data: bytes, max_pixels: int = 80_000_000) -> tuple[Image.Image, DicomMeta]:
    """Decode frame 0 of a DICOM photograph to an RGB image, with its safe metadata.

    Raises :class:`DicomError` (an :class:`~fundus_edge.errors.ImageError`) for a file that is not a DICOM
    photograph or cannot be decoded, and :class:`MissingDependencyError` when pydicom is not installed.
    """
    pydicom = _pydicom()
    from pydicom.errors import InvalidDicomError

    if not is_dicom(data):
        raise DicomError("not-an-image", "not a DICOM file (no 'DICM' after the 128-byte preamble)", "not-dicom")
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        sop_class_uid = str(ds.get("SOPClassUID", "")) or str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
        sop_class = pydicom.uid.UID(sop_class_uid).name if sop_class_uid else "unknown SOP class"
        _refuse_non_photo(ds, sop_class_uid, sop_class)
        syntax = str(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2"))
        _check_pixels(ds, syntax, max_pixels)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        img = _native_frame(ds) if syntax in NATIVE_SYNTAXES else _encapsulated_frame(ds, frames)
        return img, _meta(ds, sop_class_uid, sop_class, syntax, frames)
    except DicomError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DicomError("too-large", f"DICOM frame refused as a possible decompression bomb: {exc}",
                         "too-large") from exc
    except MemoryError as exc:
        raise DicomError("too-large", "not enough memory to decode this DICOM image", "too-large") from exc
    except (InvalidDicomError, OSError, ValueError, TypeError, KeyError, AttributeError, IndexError,
            EOFError, StopIteration) as exc:
        raise DicomError("decode-failed", f"cannot decode the DICOM file: {type(exc).__name__}: {exc}",
                         "damaged") from exc


@dataclass(frozen=True)
class DicomContext:
    """What a stored result files back to (the study) and the imaged eye (R | L), from the header alone."""

    study_instance_uid: str | None
    eye: str | None


def dicom_context(data: bytes) -> DicomContext | None:
    """The study UID and laterality of a DICOM file's header (pixels not read; no demographics read), or None
    when the header cannot be read or pydicom is not installed (decoding the file then says why)."""
    try:
        pydicom = _pydicom()
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "Laterality", "ImageLaterality"])
        sides = [_text(ds, k) for k in ("ImageLaterality", "Laterality")]  # the image's own first, then the series'
        study = _text(ds, "StudyInstanceUID")
    except Exception:  # any damage: the screening of the file reports it
        return None
    return DicomContext(study, next((s for s in sides if s in ("R", "L")), None))
