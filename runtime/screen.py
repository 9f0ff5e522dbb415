"""Screen images with a verified bundle: preprocess -> infer -> referable probability -> decision."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ImageError, UsageError
from .backends import Backend, BackendSettings, create_backend
from .bundle import Artifact, Bundle, load_bundle
from .postprocess import referable_probability
from .preprocess import preprocess
from .quality import QualitySpec, assess

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}


@dataclass
class ScreeningResult:
    """The outcome for one image. Truthy when the image was screened (whatever the decision)."""

    source: str
    decision: str | None = None  # "refer" | "no-refer" | "ungradable" (no referral decision; see `quality`)
    probability: float | None = None
    threshold: float | None = None
    bundle_id: str | None = None
    artifact: str | None = None
    fov: dict[str, Any] | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    error: dict[str, str] | None = None
    # The image-quality check (runtime/quality.py): gradable, score, failed measures, reasons, hint, measures.
    quality: dict[str, Any] | None = None

    def __bool__(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"source": self.source, "ok": self.error is None}
        for key in ("decision", "probability", "threshold", "bundle_id", "artifact", "fov", "error", "quality"):
            value = getattr(self, key)
            if value is not None:
                d[key] = round(value, 6) if isinstance(value, float) else value
        d["timings_ms"] = {k: round(v, 2) for k, v in self.timings_ms.items()}
        return d


class Screener:
    """A bundle plus an active backend. Create with :func:`fundus_edge.runtime.load`."""

    def __init__(self, bundle: Bundle, artifact: Artifact, backend: Backend,
                 quality: QualitySpec | None = None) -> None:
        self.bundle = bundle
        self.artifact = artifact
        self.backend = backend
        self.quality = quality if quality is not None else bundle.quality
        self.spec = bundle.preprocessing
        if artifact.layout != self.spec.layout:
            self.spec = type(self.spec).from_dict({**self.spec.to_dict(), "layout": artifact.layout})

    def screen(self, source: str | os.PathLike[str] | bytes) -> ScreeningResult:
        """Screen one image. Bad images give a result with ``error`` set; they never raise."""
        name = "<bytes>" if isinstance(source, bytes) else str(source)
        result = ScreeningResult(source=name, bundle_id=self.bundle.bundle_id, artifact=self.artifact.id)
        check = self.quality.enabled
        try:
            pre = preprocess(source, self.spec, quality_size=self.quality.size if check else None)
        except ImageError as exc:
            result.error = {"code": exc.code, "message": str(exc)}
            return result
        result.fov = pre.fov.to_dict()
        result.timings_ms = dict(pre.timings_ms)
        if check:  # an ungradable image gets no referral decision, and no inference
            q = assess(pre, self.quality)
            result.quality = q.to_dict()
            result.timings_ms["quality"] = q.timings_ms
            if not q:
                result.decision = "ungradable"
                return result
        t0 = time.perf_counter()
        logits = self.backend.infer(pre.tensor)
        t1 = time.perf_counter()
        p = float(referable_probability(logits, self.bundle.positive_classes)[0])
        t2 = time.perf_counter()
        result.probability = p
        result.threshold = self.bundle.operating_point.threshold
        result.decision = self.bundle.operating_point.decide(p)
        result.timings_ms.update(infer=(t1 - t0) * 1e3, postprocess=(t2 - t1) * 1e3)
        return result

    def screen_many(self, sources: Iterable[str | os.PathLike[str]]) -> Iterator[ScreeningResult]:
        for s in sources:
            yield self.screen(s)

    def close(self) -> None:
        self.backend.deactivate()

    def __enter__(self) -> Screener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(bundle: str | os.PathLike[str] | Bundle, artifact: str | None = None, fmt: str | None = None,
         precision: str | None = None, settings: BackendSettings | None = None,
         quality: QualitySpec | None = None) -> Screener:
    """Load and verify a bundle, pick an artifact (default: the manifest's), and activate its backend.

    ``quality``: replaces the bundle's quality spec (e.g. to measure without the gate: ``enabled=False``).
    """
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    art = b.artifact(artifact, fmt=fmt, precision=precision)
    backend = create_backend(art.format, b.path(art), settings)
    backend.activate()
    return Screener(b, art, backend, quality)


def expand_inputs(items: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Files as given; directories expanded (sorted, recursively) to their image files."""
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                           and not f.name.startswith("."))
            if not found:
                raise UsageError(f"directory {p} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out.extend(str(f) for f in found)
        else:
            out.append(str(p))
    return out
