"""Train the reference vessel U-Net on the expert masks of HRF and CHASE_DB1 (CPU, about 40 minutes).

    python -m fundus_edge.models.train_vessels --data /work/shared/open-fundus --out models/weights/vessels-unet.pt

Inputs go through the runtime's dense preprocessing (runtime/dense.py), the one implementation the device uses.
Splits (fixed, by file name; the test images are never read before training ends):

- CHASE_DB1: the common split, Image_01L..Image_10R (20) for training, Image_11L..Image_14R (8) for test.
  Image_10L/R are held out of the 20 as validation (threshold locking).
- HRF: the common split, the first 5 of each category (01-05 _h/_dr/_g, 15) for training, 06-15 (27 with expert
  masks; 11_h, 12_h, 13_h have none) for test. 05_h/_dr/_g are held out of the 15 as validation.

Metrics are pixel-level, pooled over a split, in the original photographs' pixels, inside the FOV: HRF's expert
FOV masks; CHASE_DB1 has none, so the runtime's detected FOV circle.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..datasets.open_fundus import Photo, chase_db1, find_root, hrf
from ..runtime.dense import DensePreprocessSpec, prepare, stitch
from .unet import unet

ARCH = "fundus-edge:unet"
ARCH_KWARGS: dict[str, Any] = {"in_channels": 1, "width": 8, "depth": 3}
SPEC = DensePreprocessSpec(fov_diameter=1024, color="grey", clahe=True, clahe_clip=2.0, clahe_tiles=8, gamma=1.0,
                           normalize="none", multiple=16, tile=384, overlap=32)
VAL = {"Image_10L", "Image_10R", "05_h", "05_dr", "05_g"}


def splits(root: Path) -> dict[str, list[Photo]]:
    """train / val / test-hrf / test-chase_db1 photographs (those with an expert vessel mask)."""
    h = [p for p in hrf(root) if p.vessels is not None]
    c = [p for p in chase_db1(root) if p.vessels is not None]
    h_train = [p for p in h if int(p.path.stem.split("_")[0]) <= 5]
    c_train = [p for p in c if int(p.path.stem[6:8]) <= 10]
    seen = {p.path for p in h_train + c_train}
    return {
        "train": [p for p in h_train + c_train if p.path.stem not in VAL],
        "val": [p for p in h_train + c_train if p.path.stem in VAL],
        "test-hrf": [p for p in h if p.path not in seen],
        "test-chase_db1": [p for p in c if p.path not in seen],
    }


@dataclass
class Sample:
    image: np.ndarray  # (C, h, w) float32, padded by `pad` on every side
    target: np.ndarray  # (h, w) float32 0/1
    fov: np.ndarray  # (h, w) bool
    centres: np.ndarray  # flat indices of FOV pixels (in the padded frame)


def load_sample(photo: Photo, spec: DensePreprocessSpec, pad: int) -> Sample:
    d = prepare(photo.path, spec)
    assert photo.vessels is not None
    with Image.open(photo.vessels) as im:
        mask = im.convert("L")
    target = np.asarray(d.geometry.to_working(mask, "bilinear"), np.float32) >= 127.5
    img = np.pad(d.image, ((0, 0), (pad, pad), (pad, pad)))
    tgt = np.pad(target.astype(np.float32), pad)
    fov = np.pad(d.fov_mask, pad)
    return Sample(img, tgt, fov, np.flatnonzero(fov[::4, ::4]))


def batch(samples: list[Sample], size: int, patch: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    """Random patches centred in the FOV, flips, 90-degree rotations, contrast/brightness jitter."""
    xs, ys = [], []
    half = patch // 2
    for _ in range(size):
        s = samples[int(rng.integers(len(samples)))]
        w4 = s.fov[::4, ::4].shape[1]
        flat = int(s.centres[int(rng.integers(len(s.centres)))])
        cy, cx = (flat // w4) * 4, (flat % w4) * 4
        y0, x0 = min(max(cy - half, 0), s.target.shape[0] - patch), min(max(cx - half, 0), s.target.shape[1] - patch)
        x = s.image[:, y0:y0 + patch, x0:x0 + patch].copy()
        y = s.target[y0:y0 + patch, x0:x0 + patch].copy()
        f = s.fov[y0:y0 + patch, x0:x0 + patch]
        x = np.clip(x * rng.uniform(0.8, 1.2) + rng.uniform(-0.1, 0.1), 0.0, 1.0) * f
        if rng.random() < 0.5:
            x, y = x[:, :, ::-1], y[:, ::-1]
        k = int(rng.integers(4))
        x, y = np.rot90(x, k, axes=(1, 2)), np.rot90(y, k)
        xs.append(np.ascontiguousarray(x))
        ys.append(np.ascontiguousarray(y)[None])
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice: BCE for calibrated probabilities, Dice for the thin-vessel / background imbalance."""
    bce = nn.functional.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


@torch.no_grad()
def segment(model: nn.Module, photo: Path, spec: DensePreprocessSpec, batch_size: int = 4) -> np.ndarray:
    """Probability map in the photo's pixels, through the runtime's tiling and stitching."""
    d = prepare(photo, spec)
    outs = [model(torch.from_numpy(d.tensors[i:i + batch_size])).numpy() for i in range(0, len(d.tensors), batch_size)]
    return stitch(np.concatenate(outs), d.geometry, logits=True, overlap=spec.overlap)


def _fov_for(photo: Photo, prob_shape: tuple[int, ...], spec: DensePreprocessSpec) -> np.ndarray:
    if photo.fov is not None:
        with Image.open(photo.fov) as im:
            return np.asarray(im.convert("L")) > 127
    return prepare(photo.path, spec).geometry.original_fov_mask()


def pixel_scores(model: nn.Module, photos: list[Photo], spec: DensePreprocessSpec) -> tuple[np.ndarray, np.ndarray]:
    """Pooled FOV pixels: histogram counts (65536 probability bins) of vessel and background pixels."""
    pos, neg = np.zeros(65536, np.int64), np.zeros(65536, np.int64)
    for p in photos:
        prob = segment(model, p.path, spec)
        assert p.vessels is not None
        with Image.open(p.vessels) as im:
            gt = np.asarray(im.convert("L")) > 127
        fov = _fov_for(p, prob.shape, spec)
        bins = np.minimum((prob * 65536).astype(np.int64), 65535)
        pos += np.bincount(bins[fov & gt], minlength=65536)
        neg += np.bincount(bins[fov & ~gt], minlength=65536)
    return pos, neg


def metrics(pos: np.ndarray, neg: np.ndarray, threshold: float | None = None) -> dict[str, float]:
    """AUC (ties within a bin count half), and F1/sensitivity/specificity/accuracy at the threshold
    (max-F1 threshold when None)."""
    cpos, cneg = np.cumsum(pos[::-1])[::-1], np.cumsum(neg[::-1])[::-1]  # counts >= bin
    npos, nneg = int(pos.sum()), int(neg.sum())
    below_neg = nneg - cneg
    auc = float(((below_neg + 0.5 * neg) * pos).sum() / (npos * nneg))
    f1_all = 2 * cpos / np.maximum(cpos + cneg + npos, 1)
    i = int(np.argmax(f1_all)) if threshold is None else min(int(threshold * 65536), 65535)
    tp, fp = int(cpos[i]), int(cneg[i])
    return {"auc": round(auc, 4), "f1": round(2 * tp / (tp + fp + npos), 4), "sensitivity": round(tp / npos, 4),
            "specificity": round(1 - fp / nneg, 4), "accuracy": round((tp + nneg - fp) / (npos + nneg), 4),
            "threshold": round(i / 65536, 4), "pixels": npos + nneg, "vessel_fraction": round(npos / (npos + nneg), 4)}


def train(data: Path, out: Path, minutes: float = 40.0, patch: int = 128, batch_size: int = 12, lr: float = 3e-3,
          seed: int = 0, threads: int = 2, init: Path | None = None) -> dict[str, Any]:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    sp = splits(data)
    samples = [load_sample(p, SPEC, patch // 2) for p in sp["train"]]
    print(f"loaded {len(samples)} training images ({time.time() - t0:.0f}s)", flush=True)
    model = unet(num_classes=1, **ARCH_KWARGS)
    previous: dict[str, Any] = {}
    if init is not None:  # continue from an earlier run of this script (same architecture and preprocessing)
        ckpt = torch.load(str(init), map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["state_dict"])
        previous = {"init": init.name, "steps": ckpt["training"]["steps"], "seconds": ckpt["training"]["seconds"],
                    "lr": ckpt["training"]["lr"],
                    "seed": ckpt["training"].get("seed"), "earlier": ckpt["training"].get("previous", {})}
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    # The schedule runs on wall-clock time (cosine over the budget), so the run fits the budget however busy
    # the machine is; the number of steps it reached is recorded.
    budget = minutes * 60 - (time.time() - t0) - 330  # leave time to evaluate
    t_start, step, running = time.time(), 0, 0.0
    model.train()
    while (elapsed := time.time() - t_start) < budget:
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        x, y = batch(samples, batch_size, patch, rng)
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {running:.4f} lr {opt.param_groups[0]['lr']:.5f} ({time.time() - t0:.0f}s)",
                  flush=True)
    total = step
    train_seconds = time.time() - t0
    model.eval()
    val = metrics(*pixel_scores(model, sp["val"], SPEC))
    threshold = val["threshold"]
    results = {name: metrics(*pixel_scores(model, sp[name], SPEC), threshold=threshold)
               for name in ("test-hrf", "test-chase_db1")}
    meta = {
        "arch": ARCH, "arch_kwargs": ARCH_KWARGS, "num_classes": 1, "task": "segmentation",
        "class_names": ["vessel"], "output": "logits [N, 1, H, W]; sigmoid -> vessel probability",
        "dense_preprocessing": SPEC.to_dict(), "threshold": threshold,
        "training": {
            "data": "HRF (Budai et al. 2013) + CHASE_DB1 (Fraz et al. 2012) expert vessel masks, CC BY 4.0",
            "splits": {k: [p.path.stem for p in v] for k, v in sp.items()},
            "patch": patch, "batch": batch_size, "steps": total, "lr": lr, "seed": seed,
            "loss": "BCE + soft Dice", "parameters": sum(p.numel() for p in model.parameters()),
            "seconds": round(train_seconds), "threads": threads,
            "torch": str(torch.__version__), "val": val, "test": results, "previous": previous,
            "metrics": "pooled FOV pixels in the original photos; HRF expert FOV, CHASE_DB1 detected FOV",
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fundus_edge_checkpoint": 1, "state_dict": model.state_dict(), **meta}, out)
    write_card(meta, out.parent.parent / "cards" / f"{out.stem}.md", out.name)
    print(json.dumps({"val": val, "test": results, "seconds": round(time.time() - t0)}), flush=True)
    return meta


def _row(name: str, m: dict[str, Any]) -> str:
    return (f"| {name} | {m['auc']:.4f} | {m['f1']:.4f} | {m['sensitivity']:.4f} | {m['specificity']:.4f} | "
            f"{m['accuracy']:.4f} | {m['pixels']:,} |")


def _stages(training: dict[str, Any]) -> list[dict[str, Any]]:
    """Every stage of a chain of ``--init`` runs, oldest first (each checkpoint records the ones before it)."""
    chain, prev = [training], training.get("previous") or {}
    while prev:
        chain.append(prev)
        prev = prev.get("earlier") or {}
    return list(reversed(chain))


def _seed(stage: dict[str, Any], index: int) -> Any:
    """A stage's seed (checkpoints before the seed was recorded in the chain used the stage's index)."""
    return stage["seed"] if stage.get("seed") is not None else index


def _chain_text(stages: list[dict[str, Any]], steps_text: str, total_min: float) -> str:
    if len(stages) == 1:
        return f"{steps_text}."
    budget = " (over the 45-minute budget)" if total_min > 45 else ""
    return (f"{len(stages)} wall-clock-budgeted stages, each continuing the previous one's weights (`--init`): "
            f"{steps_text}; {sum(st['steps'] for st in stages)} steps, {total_min:.0f} min of training in all{budget}. "
            "Each further stage was started because the training loss was still falling, and its weights were "
            "adopted only when the validation AUC rose; test photos were evaluated at the end of each stage and "
            "never used to choose anything.")


def write_card(meta: dict[str, Any], path: Path, weights: str) -> None:
    """The model card, from the numbers the run measured."""
    t, spec = meta["training"], meta["dense_preprocessing"]
    sp = t["splits"]
    stages = _stages(t)
    steps_text = "; ".join(f"stage {i + 1}: {st['steps']} steps in {st['seconds'] / 60:.0f} min "
                           f"(lr {st['lr']}, seed {_seed(st, i)})" for i, st in enumerate(stages))
    total_min = sum(st["seconds"] for st in stages) / 60
    reproduce = "\n".join(
        f"    python -m fundus_edge.models.train_vessels --data /work/shared/open-fundus "
        f"--out {'models/weights/' + weights if i == len(stages) - 1 else f'stage{i + 1}.pt'}"
        f"{f' --init stage{i}.pt' if i else ''} --lr {st['lr']} --seed {_seed(st, i)} "
        f"--minutes {st['seconds'] / 60 + 6:.0f}"
        for i, st in enumerate(stages))
    met = all(v["auc"] >= 0.97 and v["f1"] >= 0.78 for v in t["test"].values())
    rows = "\n".join([_row("validation (threshold locked here)", t["val"])]
                     + [_row(k, v) for k, v in t["test"].items()])
    text = f"""# {path.stem}: reference retinal vessel segmentation (U-Net)

- **What**: {meta['arch']} ({json.dumps(meta['arch_kwargs'])}), {t['parameters']:,} parameters; output
  {meta['output']}. Locked threshold on the probability: **{meta['threshold']}** (max F1 on validation).
- **Input**: runtime/dense.py with the spec stored in the weights (`dense_preprocessing`): FOV detected and
  scaled to {spec['fov_diameter']} px across, {spec['color']} channel, CLAHE (clip {spec['clahe_clip']},
  {spec['clahe_tiles']}x{spec['clahe_tiles']} tiles, OpenCV's algorithm), gamma {spec['gamma']}, [0, 1];
  tiles of {spec['tile']} px with {spec['overlap']} px overlap, blended; outputs mapped back to the photo's pixels.
- **Data**: {t['data']} (citations in `/work/shared/open-fundus/PROVENANCE.md`). Downscaled copies: HRF
  1752x1168, CHASE_DB1 999x960; first observer's masks for CHASE_DB1.
- **Split** (standard test splits; validation carved from the training split):
  train {len(sp['train'])} ({', '.join(sp['train'])}); validation {', '.join(sp['val'])};
  test HRF {len(sp['test-hrf'])} (06-15 of each category with masks; 11-13_h have none), test CHASE_DB1
  {len(sp['test-chase_db1'])} ({', '.join(sp['test-chase_db1'])}). Test photos were never read before training ended.
- **Training**: random {t['patch']} px patches centred in the FOV, batch {t['batch']}, flips, 90-degree
  rotations, contrast/brightness jitter; {t['loss']}; AdamW, cosine over the wall-clock budget;
  {_chain_text(stages, steps_text, total_min)} Trained on a 2-core machine shared with other jobs
  ({t['threads']} torch thread(s) in the last stage; torch {t['torch']}); wall-clock budgets, so a quieter machine
  runs more steps.

## Results (pixel level, pooled over each split, in the original photos' pixels, inside the FOV)

FOV: HRF's expert FOV masks; CHASE_DB1 has none, so the runtime's detected FOV circle (this includes the dark
rim, which is easy background: specificity and accuracy there are slightly flattering).

| split | AUC | F1 (Dice) | sensitivity | specificity | accuracy | FOV pixels |
|---|---|---|---|---|---|---|
{rows}

Targets were AUC >= 0.97 and F1 >= 0.78 on each test set: **{'met' if met else 'NOT met'}**; published small
U-Nets reach ~0.98 / ~0.80 (at full resolution, trained for hours on a GPU). HRF is evaluated at 1752x1168, not
the original 3504x2336.

## Limits

- Trained on {len(sp['train'])} photographs from two cameras (Canon CR-1 adults, Nidek NM-200-D children): other
  cameras, fields of view and pathologies (haemorrhages, exudates, laser scars) are untested.
- A research reference for the kit's pipeline (export, int8, device runtime), not a medical device. Vessel
  biomarkers computed from its masks (runtime/biomarkers.py) are comparable only between photos processed the same way.

## Reproduce

{reproduce}

More steps are the first thing to try: the loss was still falling when the budget ended (`--minutes`).
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="open-fundus folder (default: find_root())")
    ap.add_argument("--out", type=Path, default=Path("models/weights/vessels-unet.pt"))
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock budget, evaluation included")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", type=Path, default=None, help="continue from weights this script saved")
    a = ap.parse_args(argv)
    train(find_root(a.data), a.out, a.minutes, a.patch, a.batch, a.lr, a.seed, a.threads, a.init)


if __name__ == "__main__":
    main()
