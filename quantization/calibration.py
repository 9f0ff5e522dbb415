"""Calibration data: fundus images through the runtime's preprocessing, fed to onnxruntime's calibrator."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError, ImageError
from ..runtime.preprocess import PreprocessSpec, preprocess
from ..runtime.quality import QualitySpec, assess


@dataclass
class PreparedInputs:
    """Preprocessed tensors of a set of images, with what could not be used."""

    tensors: np.ndarray  # (N, ...) float32
    sources: list[str]
    skipped: list[dict[str, str]]
    quality: list[dict[str, Any]] | None = None  # per source, when a quality spec was given

    @property
    def gradable(self) -> np.ndarray | None:
        return None if self.quality is None else np.array([q["gradable"] for q in self.quality], dtype=bool)


def prepare_inputs(sources: Sequence[str | os.PathLike[str]], spec: PreprocessSpec,
                   progress: Any = None, quality: QualitySpec | None = None) -> PreparedInputs:
    """Preprocess every image once (bad images are recorded and skipped); with ``quality``, judge each one."""
    tensors: list[np.ndarray] = []
    used: list[str] = []
    skipped: list[dict[str, str]] = []
    judged: list[dict[str, Any]] = []
    for i, src in enumerate(sources):
        try:
            pre = preprocess(src, spec, quality_size=quality.size if quality else None)
            if quality:
                judged.append(assess(pre, quality).to_dict())
            tensors.append(pre.tensor[0])
            used.append(str(src))
        except ImageError as exc:
            skipped.append({"source": str(src), "code": exc.code, "message": str(exc)})
        if progress is not None:
            progress(i + 1, len(sources))
    if not tensors:
        raise DataError(f"none of the {len(sources)} images could be preprocessed "
                        f"(first problem: {skipped[0]['message'] if skipped else 'no images'})")
    return PreparedInputs(np.stack(tensors).astype(np.float32), used, skipped, judged if quality else None)


def select_calibration(n_available: int, n: int, seed: int = 0) -> np.ndarray:
    """Indices of a seeded random calibration subset (all of them when ``n`` >= available)."""
    if n >= n_available:
        return np.arange(n_available)
    return np.sort(np.random.default_rng(seed).choice(n_available, size=n, replace=False))


class ArrayCalibrationReader:
    """An onnxruntime ``CalibrationDataReader``: ``get_next()`` returns one feed dict, then None; iterable too."""

    def __init__(self, tensors: np.ndarray, input_name: str) -> None:
        self._tensors = tensors
        self._input_name = input_name
        self._iter: Iterator[np.ndarray] = iter(())
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        t = next(self._iter, None)
        return None if t is None else {self._input_name: t[None, ...]}

    def rewind(self) -> None:
        self._iter = iter(self._tensors)

    def __iter__(self) -> ArrayCalibrationReader:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        feed = self.get_next()
        if feed is None:
            raise StopIteration
        return feed

    def __len__(self) -> int:
        return len(self._tensors)
