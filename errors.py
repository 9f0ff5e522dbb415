"""One exception hierarchy for the whole kit.

Every error a user can hit derives from :class:`FundusEdgeError`, carries a message that says what to do,
and maps to a stable process exit code so CI jobs can tell failures apart.
"""

from __future__ import annotations


class FundusEdgeError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with; ``code`` is a stable machine-readable name."""

    exit_code = 1
    code = "error"


class UsageError(FundusEdgeError):
    """Bad arguments or input files given by the user."""

    exit_code = 2
    code = "usage"


class MissingDependencyError(FundusEdgeError):
    """An optional package is not installed; the message names the extra to install."""

    exit_code = 3
    code = "missing-dependency"

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed. "
            f"Install it with: pip install 'fundus-edge[{extra}]'"
        )


class RuntimeMissingError(MissingDependencyError):
    """None of the packages that can provide a runtime imports; the message lists what was tried."""

    def __init__(self, package: str, extra: str, purpose: str, tried: list[str], alternatives: str = "") -> None:
        self.package = package
        self.extra = extra
        self.tried = list(tried)
        FundusEdgeError.__init__(
            self,
            f"{purpose} needs one of several packages and none imports (tried: {'; '.join(tried)}). "
            f"Install it with: pip install 'fundus-edge[{extra}]' ({package}){alternatives}",
        )


class BundleError(FundusEdgeError):
    """A bundle cannot be used: missing, wrong schema, or failed verification."""

    exit_code = 4
    code = "bundle"


class BundleIntegrityError(BundleError):
    """A file in the bundle does not match the checksum in its manifest."""

    code = "bundle-integrity"


class BundleSignatureError(BundleError):
    """A bundle's signature is missing, unknown, invalid, or not allowed by the device's trust policy."""

    code = "bundle-signature"

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason  # stable: unsigned | untrusted-key | bad-signature | malformed-signature | mismatch
        super().__init__(message)


class ModelLoadError(FundusEdgeError):
    """A model file or checkpoint could not be loaded into the named architecture."""

    exit_code = 5
    code = "model-load"


class OutputContractError(ModelLoadError):
    """The model's output is not what its task needs (shape, dtype); the message names the shape and the flags
    that would declare it. Same exit code as a model that does not load."""

    code = "output-contract"

    def __init__(self, message: str, shape: tuple[int, ...], task: str) -> None:
        self.shape = tuple(shape)
        self.task = task
        super().__init__(message)


class QuantizedReferenceError(ModelLoadError):
    """A model file brought as the build's reference is already quantized (int8 ops or weights): the reference
    must be the float model that the kit's int8 file is gated against."""

    code = "quantized-reference"


class ExportError(FundusEdgeError):
    """Export failed, or the exported model disagrees with PyTorch beyond tolerance."""

    exit_code = 6
    code = "export"


class QuantizationError(FundusEdgeError):
    """Quantization could not produce a model."""

    exit_code = 7
    code = "quantization"


class GateFailedError(FundusEdgeError):
    """The clinical accuracy gate failed; no bundle was written unless explicitly allowed."""

    exit_code = 8
    code = "gate-failed"


class GateInsufficientEvidenceError(FundusEdgeError):
    """The gate saw no harm, but its confidence bounds could not show the margins on this many images (INSUFFICIENT
    EVIDENCE); no bundle was written unless explicitly allowed. The message says how many images would."""

    exit_code = 15
    code = "gate-insufficient-evidence"


class ParityError(FundusEdgeError):
    """Two runners of the same model disagree beyond tolerance (``compare``; x86 vs an emulated device)."""

    exit_code = 11
    code = "parity"


class DataError(FundusEdgeError):
    """A labels file or image folder cannot be used at all (individual bad rows are reported, not raised)."""

    exit_code = 9
    code = "data"


class StoreError(FundusEdgeError):
    """The result store cannot be opened or written (disk full, read-only, damaged, newer schema)."""

    exit_code = 14
    code = "store"


class ImageError(FundusEdgeError):
    """One image cannot be screened. Raised per image; a batch records it and continues.

    ``code`` is one of the stable per-image error codes listed in :data:`IMAGE_ERROR_CODES`.
    """

    exit_code = 10

    def __init__(self, code: str, message: str) -> None:
        if code not in IMAGE_ERROR_CODES:
            raise ValueError(f"unknown image error code {code!r}")
        self.code = code
        super().__init__(message)


class DicomError(ImageError):
    """A DICOM file that is not a photograph the runtime can screen (``runtime/dicom.py``).

    ``code`` is a stable per-image code (not-an-image, unsupported-mode, decode-failed, too-large), so a batch
    records it like any other image; ``reason`` says more, stably: not-dicom | no-pixel-data |
    not-a-photograph | photometric | bit-depth | transfer-syntax | pixel-data | too-large | damaged.
    """

    def __init__(self, code: str, message: str, reason: str, sop_class_uid: str = "") -> None:
        self.reason = reason
        self.sop_class_uid = sop_class_uid
        super().__init__(code, message)


IMAGE_ERROR_CODES = {
    "not-found": "the file does not exist or is not readable",
    "empty-file": "the file is empty",
    "not-an-image": "the file is not an image format the runtime can read",
    "decode-failed": "the image is truncated or corrupt",
    "too-large": "the image exceeds the pixel limit (decompression-bomb guard)",
    "too-small": "the image is too small to screen",
    "unsupported-mode": "the image's pixel format cannot be converted to RGB",
    "internal-error": "an unexpected error while screening this image; the batch went on (please report it)",
}


class MissingToolError(FundusEdgeError):
    """A host tool (not a Python package) is missing; the message says how to install it."""

    exit_code = 3
    code = "missing-tool"


class DeviceError(FundusEdgeError):
    """A device profile is invalid, or a device cannot run what was asked."""

    exit_code = 12
    code = "device"


class DeviceFitError(DeviceError):
    """A bundle does not fit the device's memory (measured peak RSS above the budget, or killed by the cap)."""

    code = "device-fit"


class EmulationError(DeviceError):
    """The emulation root cannot be built or the emulated run failed."""

    exit_code = 13
    code = "emulation"
