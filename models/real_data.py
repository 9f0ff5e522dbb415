"""Real fundus photographs as cached model inputs, for training and evaluating the real reference DR model.

Every photograph goes once through the runtime's one preprocessing (``runtime.preprocess``: FOV detection,
square crop, optional Ben Graham local-average subtraction, normalisation) and is cached as float16, so the
model is trained and evaluated on exactly what the device will feed it. Torch-free (numpy + pillow).

Data: IDRiD part B (CC BY 4.0, Porwal et al. 2018) and HRF (Budai et al. 2013); see the open-fundus
PROVENANCE.md for the licences and citations.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ..datasets.open_fundus import Photo, hrf, idrid
from ..errors import DataError
from ..runtime.preprocess import PreprocessSpec, preprocess

# Ben Graham's local-average subtraction (sigma = 1/30 of the crop side) evens out illumination and colour
# between cameras; measured here it lifted external (HRF) AUC far more than anything else tried.
SPEC = PreprocessSpec(size=256, ben_graham_sigma=1 / 30)


@dataclass
class PhotoSet:
    """Preprocessed photographs (float16, the spec's layout) with their labels."""

    x: np.ndarray
    y: np.ndarray  # 1 = referable DR
    names: list[str]
    groups: list[str]  # IDRiD grade ("grade-0".."grade-4") or HRF diagnosis

    def subset(self, idx: np.ndarray) -> PhotoSet:
        return PhotoSet(self.x[idx], self.y[idx], [self.names[i] for i in idx], [self.groups[i] for i in idx])


def _one(args: tuple[str, dict[str, object]]) -> np.ndarray:
    path, spec = args
    return preprocess(path, PreprocessSpec.from_dict(spec)).tensor[0].astype(np.float16)


def _group(p: Photo) -> str:
    return p.diagnosis if p.diagnosis is not None else f"grade-{p.grade}"


def load_set(photos: list[Photo], spec: PreprocessSpec, cache_dir: Path | None, workers: int = 2) -> PhotoSet:
    """Preprocess ``photos`` (once; cached in ``cache_dir`` keyed by the spec and the file list)."""
    if not photos:
        raise DataError("no photographs found: check --data (the open-fundus folder with idrid/ and hrf/)")
    names = [p.path.name for p in photos]
    y = np.array([int(p.referable or 0) for p in photos], dtype=np.int64)
    groups = [_group(p) for p in photos]
    key = hashlib.sha256(json.dumps([spec.to_dict(), [str(p.path) for p in photos]]).encode()).hexdigest()[:16]
    cached = cache_dir / f"{photos[0].dataset}-{key}.npy" if cache_dir else None
    if cached is not None and cached.is_file():
        return PhotoSet(np.load(cached), y, names, groups)
    jobs = [(str(p.path), spec.to_dict()) for p in photos]
    with get_context("fork").Pool(workers) as pool:
        x = np.stack(pool.map(_one, jobs, chunksize=8))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        np.save(cached, x)
    return PhotoSet(x, y, names, groups)


def split_train_val(data: PhotoSet, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a validation split carved from IDRiD train, stratified by DR grade (group)."""
    rng = np.random.default_rng(seed)
    val: list[int] = []
    for g in sorted(set(data.groups)):
        idx = np.array([i for i, gi in enumerate(data.groups) if gi == g])
        rng.shuffle(idx)
        val += idx[: round(val_fraction * len(idx))].tolist()
    val_idx = np.array(sorted(val), dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(data.y)), val_idx)
    return train_idx, val_idx


def idrid_set(root: Path, split: str, spec: PreprocessSpec, cache_dir: Path | None) -> PhotoSet:
    return load_set(idrid(root, split), spec, cache_dir)


def hrf_set(root: Path, spec: PreprocessSpec, cache_dir: Path | None) -> PhotoSet:
    return load_set(hrf(root), spec, cache_dir)
