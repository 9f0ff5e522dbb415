"""Evaluate a real referable-DR checkpoint once on IDRiD's official test split and on HRF (external camera).

    python -m fundus_edge.models.eval_real --model models/weights/dr-resnet18s-idrid.pt \\
        --data /work/shared/open-fundus --out report.json

Photographs go through the checkpoint's own preprocessing spec (the runtime's one implementation). Reports AUC
with a 95 % bootstrap CI, sensitivity / specificity at the operating point locked on the IDRiD-train validation
split (stored in the checkpoint), and HRF per diagnosis (healthy / glaucoma / diabetic retinopathy). One forward
pass per photograph, as on the device (no test-time augmentation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..datasets.open_fundus import find_root
from ..errors import UsageError
from ..gate.metrics import auc, bootstrap_auc_ci, confusion, sensitivity_specificity
from ..runtime.preprocess import PreprocessSpec
from .real_data import PhotoSet, hrf_set, idrid_set
from .train_real import DEFAULT_CACHE, scores


def summarize(data: PhotoSet, s: np.ndarray, threshold: float, n_boot: int = 2000) -> dict[str, Any]:
    """AUC with bootstrap CI and the decisions at ``threshold``."""
    ci = bootstrap_auc_ci(data.y, s, n_boot=n_boot, seed=0)
    sens, spec = sensitivity_specificity(data.y, s, threshold)
    return {"n": len(data.y), "n_referable": int(data.y.sum()), "auc": round(auc(data.y, s), 4),
            "auc_ci95": [round(ci.low, 4), round(ci.high, 4)], "threshold": round(threshold, 6),
            "sensitivity": round(sens, 4), "specificity": round(spec, 4), "confusion": confusion(data.y, s, threshold)}


def per_group(data: PhotoSet, s: np.ndarray, threshold: float) -> dict[str, Any]:
    """Per group (HRF diagnosis / IDRiD grade): how many, median score, fraction called referable."""
    out: dict[str, Any] = {}
    groups = np.array(data.groups)
    for g in sorted(set(data.groups)):
        m = groups == g
        out[g] = {"n": int(m.sum()), "median_score": round(float(np.median(s[m])), 4),
                  "referred": round(float((s[m] >= threshold).mean()), 4)}
    return out


def hrf_pairs(data: PhotoSet, s: np.ndarray) -> dict[str, float]:
    """AUC of DR against each non-DR diagnosis separately."""
    groups = np.array(data.groups)
    dr = groups == "diabetic retinopathy"
    out = {}
    for other in ("healthy", "glaucoma"):
        m = dr | (groups == other)
        out[f"dr_vs_{other}"] = round(auc(data.y[m], s[m]), 4)
    return out


def evaluate(model_path: Path, data_root: Path, cache_dir: Path | None = DEFAULT_CACHE,
             threshold: float | None = None) -> dict[str, Any]:
    """Scores on IDRiD test and HRF; ``threshold`` defaults to the checkpoint's locked operating point."""
    import torch

    from ..export.load import load_model

    torch.set_num_threads(2)
    loaded = load_model(model_path)
    meta = loaded.meta
    spec = PreprocessSpec.from_dict(meta["preprocessing"])
    op = meta.get("operating_point") or {}
    if threshold is None:
        if "threshold" not in op:
            raise UsageError(f"{model_path} has no locked operating point: pass --threshold")
        threshold = float(op["threshold"])
    test = idrid_set(data_root, "test", spec, cache_dir)
    ext = hrf_set(data_root, spec, cache_dir)
    s_test, s_hrf = scores(loaded.module, test.x), scores(loaded.module, ext.x)
    return {
        "model": str(model_path), "operating_point": {**op, "threshold_used": threshold},
        "idrid_test": {**summarize(test, s_test, threshold), "per_grade": per_group(test, s_test, threshold)},
        "hrf": {**summarize(ext, s_hrf, threshold), "per_diagnosis": per_group(ext, s_hrf, threshold),
                **hrf_pairs(ext, s_hrf)},
        "hrf_scores": {n: round(float(v), 4) for n, v in zip(ext.names, s_hrf, strict=True)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", default=None, help="the open-fundus folder (default: $FUNDUS_EDGE_OPEN_FUNDUS ...)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    p.add_argument("--out", type=Path, default=None, help="write the report as JSON here too")
    p.add_argument("--threshold", type=float, default=None, help="default: the checkpoint's locked threshold")
    a = p.parse_args(argv)
    report = evaluate(a.model, find_root(a.data), a.cache, a.threshold)
    text = json.dumps(report, indent=1)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
