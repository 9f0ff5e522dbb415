"""The shipped reference vessel U-Net segments real test-split photographs (never seen in training) through the
runtime's dense preprocessing; pixel AUC against the expert masks must stay above floors its measured numbers
support (models/cards/vessels-unet.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score

from fundus_edge.export.load import load_model
from fundus_edge.runtime.biomarkers import vessel_biomarkers
from fundus_edge.runtime.dense import DensePreprocessSpec, prepare, stitch

DATA = Path(__file__).parent / "data" / "open-fundus"
# (photo, expert vessel mask, expert FOV mask or None -> the runtime's detected FOV, AUC floor). Measured with the
# shipped weights: AUC 0.919 / 0.942, F1 0.696 / 0.685 at the locked threshold (pooled test numbers in the card).
CASES = [
    (DATA / "hrf" / "images" / "06_g.jpg", DATA / "hrf" / "vessels" / "06_g.png", DATA / "hrf" / "fov" / "06_g.png",
     0.90),
    (DATA / "chase_db1" / "images" / "Image_11L.jpg", DATA / "chase_db1" / "vessels_1st" / "Image_11L_1stHO.png",
     None, 0.92),
]


@pytest.fixture(scope="module")
def model() -> tuple[torch.nn.Module, DensePreprocessSpec, float]:
    loaded = load_model("reference:vessels-unet")
    assert loaded.meta["task"] == "segmentation" and loaded.arch == "fundus-edge:unet"
    n_params = sum(p.numel() for p in loaded.module.parameters())
    assert n_params <= 1_000_000
    spec = DensePreprocessSpec.from_dict(loaded.meta["dense_preprocessing"])
    return loaded.module, spec, float(loaded.meta["threshold"])


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


@pytest.mark.parametrize("photo,vessels,fov,floor", CASES, ids=["hrf-06_g", "chase-Image_11L"])
def test_segments_a_real_photo(model: tuple[torch.nn.Module, DensePreprocessSpec, float], photo: Path,
                               vessels: Path, fov: Path | None, floor: float) -> None:
    net, spec, threshold = model
    d = prepare(photo, spec)
    torch.set_num_threads(2)
    with torch.no_grad():
        logits = np.concatenate([net(torch.from_numpy(t[None])).numpy() for t in d.tensors])
    assert logits.shape == (len(d.geometry.tiles), 1, spec.tile, spec.tile)
    prob = stitch(logits, d.geometry, logits=True, overlap=spec.overlap)
    gt = _read(vessels)
    assert prob.shape == gt.shape
    inside = _read(fov) if fov is not None else d.geometry.original_fov_mask()
    auc = roc_auc_score(gt[inside], prob[inside])
    assert auc >= floor, f"pixel AUC {auc:.4f} under the floor {floor}"
    binary = prob >= threshold
    dice = 2 * (binary & gt & inside).sum() / ((binary & inside).sum() + (gt & inside).sum())
    assert dice >= 0.65, f"F1 {dice:.3f} at the locked threshold {threshold}"
    # biomarkers of the predicted map are close to those of the expert's
    ours, expert = vessel_biomarkers(binary, inside), vessel_biomarkers(gt, inside)
    assert abs(ours.density - expert.density) < 0.4 * expert.density
    assert abs(ours.fractal_dimension - expert.fractal_dimension) < 0.1
