"""Segmentation bundles in the field session: a vessel segmentation stored like a screening.

A segmentation row has no referral decision (``decision`` is ``segmented`` or ``ungradable``, ``probability``
NULL); it holds the biomarkers (vessel density in the FOV, fractal dimension and its fit's r2) and the paths of
the mask and overlay PNGs, under the same key (image, bundle, artifact, patient, eye), row macs and audit chain
as a classification. The PNGs are named ``<photo stem>.<first 12 hex of the image sha256>.vessels.png`` (and
``.overlay.png``) so that two photos with one name in two camera folders never overwrite each other's.

:class:`SegmentationScreener` gives :class:`~fundus_edge.runtime.field.session.FieldSession` the part of the
:class:`~fundus_edge.runtime.screen.Screener` interface it uses (one image at a time: no decode/infer pipeline).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..decode_limits import DecodeLimits
from ..segment import SegmentationResult, Segmenter


class SegmentationScreener:
    """A :class:`~fundus_edge.runtime.segment.Segmenter` that writes its PNGs into ``out_dir``."""

    task = "segmentation"

    def __init__(self, segmenter: Segmenter, out_dir: Path, decode_limits: DecodeLimits | None = None) -> None:
        self.segmenter = segmenter
        self.out_dir = Path(out_dir)
        self.decode_limits = decode_limits or DecodeLimits()
        self.bundle = segmenter.bundle
        self.artifact = segmenter.artifact
        self.backend = segmenter.backend
        self.artifact_note: str | None = None

    def screen_named(self, data: bytes, source: str) -> SegmentationResult:
        """Segment ``data`` (the bytes of ``source``); never raises for a bad image."""
        if len(data) > self.decode_limits.max_file_bytes:
            return SegmentationResult(source=source, error={"code": "too-large", "message": "file is over the "
                                                            f"{self.decode_limits.max_file_bytes} byte limit"})
        stem = f"{_safe_stem(source)}.{hashlib.sha256(data).hexdigest()[:12]}"
        return self.segmenter.segment(data, self.out_dir, stem=stem)

    def screen(self, data: bytes) -> SegmentationResult:
        return self.screen_named(data, "image")

    def prepare(self, data: Any, slot: int = 0) -> Any:  # pragma: no cover - the session never pipelines these
        raise NotImplementedError("segmentation runs one image at a time in a field session")

    def close(self) -> None:
        self.backend.deactivate()


def _safe_stem(source: str) -> str:
    """The photo's stem as a file name part: no path separators, no control characters, at most 80 chars."""
    stem = Path(source).stem or "image"
    clean = "".join(c if c.isprintable() and c not in "/\\" else "_" for c in stem)
    return clean.encode("utf-8", "surrogateescape").decode("utf-8", "replace")[:80] or "image"
