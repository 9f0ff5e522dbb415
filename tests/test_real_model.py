"""The committed real referable-DR model (trained on IDRiD train; models/cards/dr-resnet18s-idrid.md).

No training here: the checkpoint loads the way `fundus-edge build` loads it, carries its preprocessing spec and
the operating point locked on the IDRiD-train validation split, and scores the real healthy eyes in the repo
(HRF healthy photographs, an external camera it never saw) below that operating point.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fundus_edge.export.load import load_model  # noqa: E402
from fundus_edge.runtime.preprocess import PreprocessSpec, preprocess  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "models" / "weights" / "dr-resnet18s-idrid.pt"
HEALTHY = sorted((ROOT / "tests" / "data" / "fundus").glob("*_h.jpg"))


@pytest.fixture(scope="module")
def loaded():  # type: ignore[no-untyped-def]
    return load_model(WEIGHTS)


def test_checkpoint_is_small_and_self_describing(loaded) -> None:  # type: ignore[no-untyped-def]
    assert WEIGHTS.stat().st_size < 2 * 1024 * 1024
    meta = loaded.meta
    assert meta["arch"] == "fundus-edge:resnet18s" and meta["num_classes"] == 2
    assert meta["positive_classes"] == [1]
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    assert spec.ben_graham_sigma and spec.size == 256
    op = meta["operating_point"]
    assert 0.0 < op["threshold"] < 1.0 and op["val_sensitivity"] >= 0.9
    assert meta["training"]["pretrained"] is None and "IDRiD" in meta["training"]["data"]


def test_healthy_real_eyes_score_below_the_locked_threshold(loaded) -> None:  # type: ignore[no-untyped-def]
    assert len(HEALTHY) == 4
    spec = PreprocessSpec.from_dict(loaded.meta["preprocessing"])
    x = np.concatenate([preprocess(p, spec).tensor for p in HEALTHY])
    with torch.no_grad():
        p_ref = torch.softmax(loaded.module(torch.from_numpy(x)), 1)[:, 1].numpy()
    threshold = loaded.meta["operating_point"]["threshold"]
    assert (p_ref < threshold).all(), dict(zip([p.name for p in HEALTHY], p_ref.round(3).tolist(), strict=True))
