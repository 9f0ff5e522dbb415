"""Train the real reference referable-DR model on IDRiD train only (CPU, from scratch, no pretrained weights).

    python -m fundus_edge.models.train_real --data /work/shared/open-fundus \\
        --out models/weights/dr-resnet18s-idrid.pt

IDRiD train (413 photographs) is split, stratified by grade, into a training part and a validation part
(``--val-fraction``); the model is trained on the training part only, so the validation part can pick the
hyperparameters and lock the operating point. Photographs go once through the runtime's preprocessing (cached as
float16); augmentation then works on tensors: flips, 90-degree rotations, a small zoom, brightness / contrast /
per-channel colour jitter and an occasional blur (cameras differ). The weights of the last epochs are averaged
(SWA) and batch-norm statistics recomputed. The test sets (IDRiD test, HRF) are not touched here: see
``fundus_edge.models.eval_real``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..datasets.open_fundus import find_root
from ..gate.metrics import auc, lock_threshold, sensitivity_specificity
from ..runtime.preprocess import PreprocessSpec
from .real_data import SPEC, PhotoSet, idrid_set, split_train_val

ARCH = "fundus-edge:resnet18s"
ARCH_KWARGS: dict[str, Any] = {"width": 16, "act": "relu6"}
DEFAULT_CACHE = Path.home() / ".cache" / "fundus-edge" / "real"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    lr: float = 3e-3
    weight_decay: float = 5e-4
    batch: int = 32
    seed: int = 1
    split_seed: int = 0
    val_fraction: float = 0.2
    swa_fraction: float = 0.3  # average the weights of this last fraction of epochs; 0 disables
    jitter: float = 1.0  # scales every photometric augmentation; 0 disables them
    blur_p: float = 0.3
    zoom: float = 0.1  # random zoom in [1 - zoom, 1 + zoom]
    operating_point: str = "sensitivity>=0.90"
    eval_every: int = 5  # validation AUC every this many epochs (it costs CPU time)


def augment(xb: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Geometric and photometric augmentation of a batch of preprocessed (normalised) tensors."""
    n = xb.shape[0]

    def u(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen) * 2 - 1

    flip = torch.rand(n, generator=gen) < 0.5
    xb[flip] = xb[flip].flip(-1)
    k = int(torch.randint(0, 4, (1,), generator=gen))
    xb = torch.rot90(xb, k, (2, 3))
    if cfg.zoom > 0:
        scale = 1 + cfg.zoom * u(n)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
        grid = F.affine_grid(theta, list(xb.shape), align_corners=False)
        background = xb[:, :, :1, :1].clone()  # the constant outside the field of view
        xb = F.grid_sample(xb - background, grid, align_corners=False) + background
    j = cfg.jitter
    if j > 0:
        contrast = 1 + 0.25 * j * u(n, 1, 1, 1)
        colour = 1 + 0.1 * j * u(n, 3, 1, 1)
        shift = 0.2 * j * u(n, 1, 1, 1) + 0.1 * j * u(n, 3, 1, 1)
        xb = xb * contrast * colour + shift
    if cfg.blur_p > 0:
        blur = torch.rand(n, generator=gen) < cfg.blur_p
        if blur.any():
            xb[blur] = F.avg_pool2d(xb[blur], 3, 1, 1, count_include_pad=False)
    return xb


def scores(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """P(referable) for a float16 batch, in eval mode."""
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), 64):
            outs.append(torch.softmax(model(torch.from_numpy(x[i : i + 64]).float()), 1)[:, 1].numpy())
    return np.concatenate(outs)


def _update_bn(model: nn.Module, x: torch.Tensor, batch: int) -> None:
    """Recompute batch-norm running statistics (cumulative average) for averaged weights."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            model(x[i : i + batch].float())
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1


def fit(train: PhotoSet, val: PhotoSet, cfg: TrainConfig, log: Any = print) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train from scratch; returns the (SWA-averaged when asked) model and the per-epoch history."""
    from ..export.load import build_architecture

    torch.manual_seed(cfg.seed)
    model = build_architecture(ARCH, 2, **ARCH_KWARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(train.y)
    steps_per_epoch = (n + cfg.batch - 1) // cfg.batch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(cfg.seed)
    xt, yt = torch.from_numpy(train.x), torch.from_numpy(train.y)
    swa_start = cfg.epochs - round(cfg.swa_fraction * cfg.epochs)
    swa: dict[str, torch.Tensor] | None = None
    n_avg = 0
    history: list[dict[str, float]] = []
    t0 = time.time()
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for i in range(0, n, cfg.batch):
            idx = perm[i : i + cfg.batch]
            loss = loss_fn(model(augment(xt[idx].float(), cfg, gen)), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if cfg.swa_fraction > 0 and epoch >= swa_start:
            sd = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}
            swa = sd if swa is None else {k: swa[k] + (sd[k] - swa[k]) / (n_avg + 1) for k in swa}
            n_avg += 1
        row = {"epoch": epoch + 1, "loss": round(total / n, 4), "seconds": round(time.time() - t0)}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            row["val_auc"] = round(auc(val.y, scores(model, val.x)), 4)
        history.append(row)
        log(" ".join(f"{k} {v}" for k, v in row.items()))
    if swa is not None:
        state = model.state_dict()
        state.update({k: v.to(state[k].dtype) for k, v in swa.items()})
        model.load_state_dict(state)
        _update_bn(model, xt, cfg.batch)
        log(f"SWA over the last {n_avg} epochs: val AUC {auc(val.y, scores(model, val.x)):.4f}")
    model.eval()
    return model, history


def checkpoint_meta(spec: PreprocessSpec, cfg: TrainConfig, val: PhotoSet, val_scores: np.ndarray,
                    n_train: int, seconds: float) -> dict[str, Any]:
    threshold = lock_threshold(val.y, val_scores, cfg.operating_point)
    sens, spec_ = sensitivity_specificity(val.y, val_scores, threshold)
    return {
        "arch": ARCH,
        "arch_kwargs": ARCH_KWARGS,
        "num_classes": 2,
        "class_names": ["no-referable", "referable"],
        "positive_classes": [1],
        "preprocessing": spec.to_dict(),
        "operating_point": {"rule": cfg.operating_point, "threshold": threshold,
                            "locked_on": "IDRiD train validation split", "val_sensitivity": round(sens, 4),
                            "val_specificity": round(spec_, 4),
                            "note": "per camera: a threshold locked on IDRiD (Kowa VX-10a) may not transfer"},
        "training": {
            "data": "IDRiD part B train (CC BY 4.0, Porwal et al. 2018), stratified split", "n_train": n_train,
            "n_val": len(val.y), "val_auc": round(auc(val.y, val_scores), 4),
            "val_prevalence": round(float(val.y.mean()), 4), "target": "referable DR (grade >= 2)",
            "config": asdict(cfg), "pretrained": None, "torch": str(torch.__version__), "seconds": round(seconds),
        },
    }


def train(data_root: Path, out: Path, cfg: TrainConfig, spec: PreprocessSpec = SPEC,
          cache_dir: Path | None = DEFAULT_CACHE, log: Any = print) -> dict[str, Any]:
    """Train, lock the operating point on the validation split, save the checkpoint; returns its metadata."""
    torch.set_num_threads(2)
    t0 = time.time()
    full = idrid_set(data_root, "train", spec, cache_dir)
    tr_idx, va_idx = split_train_val(full, cfg.val_fraction, cfg.split_seed)
    train_set, val_set = full.subset(tr_idx), full.subset(va_idx)
    log(f"data: {len(tr_idx)} train / {len(va_idx)} val (referable {train_set.y.mean():.2f} / "
        f"{val_set.y.mean():.2f}), preprocessed in {time.time() - t0:.0f}s")
    model, history = fit(train_set, val_set, cfg, log)
    return save_checkpoint(model, out, spec, cfg, val_set, len(tr_idx), time.time() - t0, history)


def save_checkpoint(model: nn.Module, out: Path, spec: PreprocessSpec, cfg: TrainConfig, val_set: PhotoSet,
                    n_train: int, seconds: float, history: list[dict[str, float]]) -> dict[str, Any]:
    """Save the weights as float16 (half the file; the kit loads them into float32) and lock the operating
    point on the validation scores of exactly those rounded weights."""
    state = {k: (v.detach().half() if v.is_floating_point() else v.detach().clone())
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # float32 parameters now hold the float16-rounded values
    val_scores = scores(model, val_set.x)
    meta = checkpoint_meta(spec, cfg, val_set, val_scores, n_train, seconds)
    meta["training"]["history"] = history
    meta["training"]["val_images"] = val_set.names
    meta["training"]["weights_dtype"] = "float16"
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fundus_edge_checkpoint": 1, "state_dict": state, **meta}, out)
    return meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="the open-fundus folder (default: $FUNDUS_EDGE_OPEN_FUNDUS ...)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where preprocessed photographs are cached")
    p.add_argument("--size", type=int, default=SPEC.size)
    p.add_argument("--ben-graham-sigma", type=float, default=SPEC.ben_graham_sigma,
                   help="Ben Graham sigma as a fraction of the crop side; 0 disables it")
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    a = p.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(a, k) for k in asdict(defaults)})
    spec = PreprocessSpec(**{**SPEC.to_dict(), "mean": SPEC.mean, "std": SPEC.std, "size": a.size,
                             "ben_graham_sigma": a.ben_graham_sigma or None})
    meta = train(find_root(a.data), a.out, cfg, spec, a.cache, lambda s: print(s, flush=True))
    t = {k: v for k, v in meta["training"].items() if k not in ("history", "val_images")}
    print(json.dumps({"training": t, "operating_point": meta["operating_point"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
