"""Screen images with a verified bundle: preprocess -> infer -> referable probability -> decision."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..bundle.read import Artifact, Bundle, load_bundle
from ..errors import ImageError, UsageError
from .backends import BACKENDS_BY_FORMAT, Backend, BackendSettings, create_backend, installed_formats
from .decode_limits import DecodeLimits
from .postprocess import referable_probability
from .preprocess import preprocess
from .quality import QualitySpec, assess

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".tif", ".tiff", ".bmp", ".webp", ".dcm"}


def has_image_suffix(name: str) -> bool:
    """Whether a file name ends in an image suffix, in any case, trailing spaces ignored (``IMG_1.JPG `` and
    ``x.jpe`` are images; some camera and phone apps write such names)."""
    return Path(name.rstrip()).suffix.lower() in IMAGE_SUFFIXES


@dataclass
class ScreeningResult:
    """The outcome for one image. Truthy when the image was screened (whatever the decision)."""

    source: str
    decision: str | None = None  # "refer" | "no-refer" | "ungradable" (no referral decision; see `quality`)
    probability: float | None = None
    threshold: float | None = None
    bundle_id: str | None = None
    artifact: str | None = None
    fov: dict[str, Any] | None = None  # in the original photo's pixels, EXIF orientation applied
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


@dataclass
class Prepared:
    """An image after decode, preprocessing and the quality check: what :meth:`Screener.finish` infers on.

    ``tensor`` is None when the result is already final (the image could not be read, or is ungradable)."""

    result: ScreeningResult
    tensor: np.ndarray | None = None


class Screener:
    """A bundle plus an active backend. Create with :func:`fundus_edge.runtime.load`.

    ``reuse_buffers``: normalisation writes into preallocated input tensors (two: one per pipeline stage)
    instead of a new array per image. ``screen_many(..., pipeline=True)`` decodes and preprocesses image N+1 in a
    worker thread while image N is inferred (Pillow's decoder and onnxruntime/LiteRT release the GIL).
    """

    def __init__(self, bundle: Bundle, artifact: Artifact, backend: Backend,
                 quality: QualitySpec | None = None, reuse_buffers: bool = True, artifact_note: str | None = None,
                 decode_limits: DecodeLimits | None = None) -> None:
        self.bundle = bundle
        # what one image may cost before it is decoded (file size, decoded memory; runtime/decode_limits.py)
        self.decode_limits = decode_limits or DecodeLimits()
        # why another artifact than the bundle's default runs (its backend is not installed here), or None
        self.artifact_note = artifact_note
        self.artifact = artifact
        self.backend = backend
        self.quality = quality if quality is not None else bundle.quality
        self.spec = bundle.preprocessing
        if artifact.layout != self.spec.layout:
            self.spec = type(self.spec).from_dict({**self.spec.to_dict(), "layout": artifact.layout})
        self.reuse_buffers = reuse_buffers
        self._buffers: list[np.ndarray] = []

    def input_buffer(self, slot: int = 0) -> np.ndarray | None:
        """The preallocated input tensor ``slot`` (0 or 1), or None when buffers are not reused."""
        if not self.reuse_buffers:
            return None
        s = self.spec.size
        shape = (1, 3, s, s) if self.spec.layout == "NCHW" else (1, s, s, 3)
        while len(self._buffers) <= slot:
            self._buffers.append(np.empty(shape, dtype=np.float32))
        return self._buffers[slot]

    def prepare(self, source: str | os.PathLike[str] | bytes, slot: int = 0) -> Prepared:
        """Decode, preprocess and check the quality of one image: all of screening before inference.

        Bad images give a final result with ``error`` set; they never raise. The tensor is written into input
        buffer ``slot``: it is valid until the next ``prepare`` with the same slot."""
        name = "<bytes>" if isinstance(source, bytes) else str(source)
        result = ScreeningResult(source=name, bundle_id=self.bundle.bundle_id, artifact=self.artifact.id)
        check = self.quality.enabled
        try:
            pre = preprocess(source, self.spec, out=self.input_buffer(slot),
                             quality_size=self.quality.size if check else None, limits=self.decode_limits)
        except ImageError as exc:
            result.error = {"code": exc.code, "message": str(exc)}
            return Prepared(result)
        result.fov = pre.original_fov.to_dict()  # the photo's own pixels (EXIF-oriented, full resolution)
        result.timings_ms = dict(pre.timings_ms)
        if check:  # an ungradable image gets no referral decision, and no inference
            q = assess(pre, self.quality)
            result.quality = q.to_dict()
            result.timings_ms["quality"] = q.timings_ms
            if not q:
                result.decision = "ungradable"
                return Prepared(result)
        return Prepared(result, pre.tensor)

    def finish(self, prepared: Prepared) -> ScreeningResult:
        """Inference and post-processing of a prepared image (nothing to do when its result is final)."""
        result = prepared.result
        if prepared.tensor is None:
            return result
        t0 = time.perf_counter()
        logits = self.backend.infer(prepared.tensor)
        t1 = time.perf_counter()
        p = float(referable_probability(logits, self.bundle.positive_classes)[0])
        t2 = time.perf_counter()
        result.probability = p
        result.threshold = self.bundle.operating_point.threshold
        result.decision = self.bundle.operating_point.decide(p)
        result.timings_ms.update(infer=(t1 - t0) * 1e3, postprocess=(t2 - t1) * 1e3)
        return result

    def screen(self, source: str | os.PathLike[str] | bytes) -> ScreeningResult:
        """Screen one image. Bad images give a result with ``error`` set; they never raise."""
        return self.finish(self.prepare(source))

    def screen_many(self, sources: Iterable[str | os.PathLike[str] | bytes],
                    pipeline: bool = False) -> Iterator[ScreeningResult]:
        """Screen images in order, one result each (bad images included).

        ``pipeline``: decode + preprocess the next image in a worker thread while this one is inferred; the
        results are the same, in the same order."""
        if not pipeline:
            for s in sources:
                yield self.screen(s)
            return
        yield from overlapped(sources, self.prepare, self.finish)

    def close(self) -> None:
        self.backend.deactivate()

    def __enter__(self) -> Screener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


S = TypeVar("S")
P = TypeVar("P")
R = TypeVar("R")


def overlapped(items: Iterable[S], first: Callable[[S, int], P], second: Callable[[P], R],
               should_stop: Callable[[], bool] | None = None) -> Iterator[R]:
    """``second(first(item))`` for every item, in order, with ``first`` of the next item running in a worker
    thread while ``second`` runs here. ``first`` gets a slot (0/1, alternating) so that the two items in flight
    never share a buffer. An exception is raised where the serial loop would raise it. ``should_stop``: checked
    before each ``second``; once true, nothing more is completed (an item already in ``first`` is dropped)."""
    it = iter(items)
    if should_stop is not None and should_stop():
        return
    try:
        head = next(it)
    except StopIteration:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fe-prepare") as pool:
        slot = 0
        pending = pool.submit(first, head, slot)
        while True:
            try:
                item = next(it)
            except StopIteration:
                upcoming = None
            else:
                slot ^= 1
                upcoming = pool.submit(first, item, slot)
            done = pending.result()
            if should_stop is not None and should_stop():
                return
            yield second(done)
            if upcoming is None:
                return
            pending = upcoming


def load(bundle: str | os.PathLike[str] | Bundle, artifact: str | None = None, fmt: str | None = None,
         precision: str | None = None, settings: BackendSettings | None = None,
         quality: QualitySpec | None = None, reuse_buffers: bool = True,
         decode_limits: DecodeLimits | None = None) -> Screener:
    """Load and verify a bundle, pick an artifact (default: the manifest's), and activate its backend.

    ``quality``: replaces the bundle's quality spec (e.g. to measure without the gate: ``enabled=False``).
    ``decode_limits``: the per-image file-size and decoded-memory budget (default: :class:`DecodeLimits`).
    """
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    if b.spec.task != "classification":
        raise UsageError(f"bundle {b.bundle_id} is a {b.spec.task} bundle: load it with "
                         "fundus_edge.runtime.segment.load_segmenter (the CLI's screen does)")
    art, note = pick_artifact(b, artifact, fmt, precision)
    # the engine is built from bytes read once and checked against the manifest, never from the path again
    backend = create_backend(art.format, b.path(art), settings, model_bytes=b.read_artifact(art))
    backend.activate()
    return Screener(b, art, backend, quality, reuse_buffers=reuse_buffers, artifact_note=note,
                    decode_limits=decode_limits)


def pick_artifact(b: Bundle, artifact: str | None = None, fmt: str | None = None,
                  precision: str | None = None) -> tuple[Artifact, str | None]:
    """The artifact to screen with, and a note when it is not the one the bundle would pick.

    An artifact named by id is used as given. Otherwise, when the backend of the bundle's choice is not installed
    here (a ``[litert]``-only install and an ONNX default), another artifact that matches ``fmt``/``precision``,
    passed the gate and whose backend is installed is used instead (the same precision first). When there is
    none, the bundle's choice stays and its backend says what to install."""
    art = b.artifact(artifact, fmt=fmt, precision=precision)
    here = installed_formats()
    if artifact or art.format in here:
        return art, None
    usable = [a for a in b.artifacts if a.format in here and (fmt is None or a.format == fmt)
              and (precision is None or a.precision == precision) and b.spec.gate_passed(a.id)]
    if not usable:
        return art, None
    alt = next((a for a in usable if a.precision == art.precision), usable[0])
    which = "default artifact" if not (fmt or precision) else "choice"
    return alt, (f"the bundle's {which} {art.id} needs {BACKENDS_BY_FORMAT[art.format]}, which is not "
                 f"installed here; screening with {alt.id} ({BACKENDS_BY_FORMAT[alt.format]}) instead")


def expand_inputs(items: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Files as given; directories expanded (sorted, recursively) to their image files."""
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and has_image_suffix(f.name)
                           and not f.name.startswith("."))
            if not found:
                raise UsageError(f"directory {p} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out.extend(str(f) for f in found)
        else:
            out.append(str(p))
    return out
