"""Train a reference model on synthetic fundus photographs, reproducibly (seeded, CPU, a few minutes).

    python -m fundus_edge.models.train --arch fundus-edge:resnet18s --out models/weights/dr-resnet18s.pt

Images go through the runtime's own preprocessing (JPEG bytes -> runtime.preprocess), so the model sees in
training exactly what the device will feed it. The result is for testing the pipeline only: synthetic
pictures carry no clinical meaning.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..datasets.synthetic import generate
from ..runtime.preprocess import PreprocessSpec, preprocess

SPEC = PreprocessSpec(size=224)
IMAGE_SIZE = 384


def _sample(args: tuple[int, int, str]) -> tuple[np.ndarray, int]:
    seed, size, camera = args
    item = generate(seed, size=size, camera=camera)
    buf = io.BytesIO()
    item.image.save(buf, format="JPEG", quality=92)
    pre = preprocess(buf.getvalue(), SPEC)
    return pre.tensor[0].astype(np.float16), item.grade


def make_split(n: int, seed: int, cameras: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    jobs = [(seed * 1_000_003 + i, IMAGE_SIZE, cameras[i % len(cameras)]) for i in range(n)]
    with get_context("fork").Pool(2) as pool:
        out = pool.map(_sample, jobs, chunksize=16)
    x = np.stack([o[0] for o in out])
    grades = np.array([o[1] for o in out], dtype=np.int64)
    return x, grades


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # average ranks for ties
    _, inv, counts = np.unique(scores, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    ranks = (sums / counts)[inv]
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def train(arch: str, out: Path, n_train: int, n_val: int, epochs: int, seed: int,
          arch_kwargs: dict[str, Any] | None = None, lr: float = 3e-3) -> dict[str, Any]:
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(2)
    cameras = ("desktop", "handheld", "darkred")
    t0 = time.time()
    x_tr, g_tr = make_split(n_train, seed=seed, cameras=cameras)
    x_va, g_va = make_split(n_val, seed=seed + 1, cameras=cameras)
    y_tr, y_va = (g_tr >= 2).astype(np.int64), (g_va >= 2).astype(np.int64)
    print(f"data: {n_train} train / {n_val} val in {time.time() - t0:.0f}s; referable {y_tr.mean():.2f}", flush=True)
    from ..export.load import build_architecture

    kwargs = dict(arch_kwargs or {})
    model = build_architecture(arch, 2, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((n_train + 31) // 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x_tr)
    yt = torch.from_numpy(y_tr)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n_train, generator=gen)
        total = 0.0
        for i in range(0, n_train, 32):
            idx = perm[i : i + 32]
            xb = xt[idx].float()
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb[flip] = xb[flip].flip(-1)
            xb = xb * (1 + 0.1 * (torch.rand(len(idx), 1, 1, 1, generator=gen) - 0.5))
            loss = loss_fn(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        val_auc = auc(y_va, _scores(model, x_va))
        print(f"epoch {epoch + 1}/{epochs} loss {total / n_train:.4f} val AUC {val_auc:.4f} "
              f"({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    final_auc = auc(y_va, _scores(model, x_va))
    meta = {
        "arch": arch,
        "arch_kwargs": kwargs,
        "num_classes": 2,
        "class_names": ["no-referable", "referable"],
        "positive_classes": [1],
        "preprocessing": SPEC.to_dict(),
        "training": {
            "data": "synthetic fundus generator (fundus_edge.datasets.synthetic), cameras " + ",".join(cameras),
            "image_size": IMAGE_SIZE, "n_train": n_train, "n_val": n_val, "train_seed": seed,
            "val_seed": seed + 1, "epochs": epochs, "lr": lr, "target": "referable DR (grade >= 2)",
            "val_auc": round(final_auc, 4), "val_prevalence": round(float(y_va.mean()), 4),
            "torch": str(torch.__version__), "seconds": round(time.time() - t0),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fundus_edge_checkpoint": 1, "state_dict": model.state_dict(), **meta}, out)
    write_card(meta, out.parent.parent / "cards" / f"{out.stem}.md", out.name)
    print(json.dumps(meta["training"]), flush=True)
    return meta


def write_card(meta: dict[str, Any], path: Path, weights: str) -> None:
    """A model card next to the weights: what it is, what it was trained on, how well, and what not to do."""
    t = meta["training"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"""# Model card: {Path(weights).stem}

- **What**: {meta['arch']} ({meta['arch_kwargs']}), {meta['num_classes']} outputs {meta['class_names']};
  referable = class {meta['positive_classes']} (DR grade >= 2).
- **Input**: {meta['preprocessing']['size']}x{meta['preprocessing']['size']} RGB through
  `fundus_edge.runtime.preprocess` (field-of-view crop, ImageNet mean/std), the same code as on the device.
- **Data**: {t['data']}; {t['n_train']} training images (seed {t['train_seed']}), {t['n_val']} held-out
  validation images (seed {t['val_seed']}), drawn at {t['image_size']} px and JPEG-encoded (quality 92).
- **Training**: AdamW + one-cycle LR, {t['epochs']} epochs, batch 32, horizontal flips and brightness jitter,
  CPU, torch {t['torch']}, {t['seconds']} s. Reproduce:
  `python -m fundus_edge.models.train --arch {meta['arch']} --arch-kwargs '{json.dumps(meta['arch_kwargs'])}'
  --epochs {t['epochs']} --lr {t.get('lr')} --out models/weights/{weights}`.
- **Metric**: held-out synthetic AUC {t['val_auc']} (prevalence {t['val_prevalence']}).
- **Use**: testing the fundus-edge pipeline (export, quantization, gate, runtime, devices).
  **Not for clinical use**: trained and evaluated on synthetic pictures only; it has never seen a real eye.
""")


def _scores(model: nn.Module, x: np.ndarray) -> np.ndarray:
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), 64):
            outs.append(torch.softmax(model(torch.from_numpy(x[i : i + 64]).float()), 1)[:, 1].numpy())
    model.train()
    return np.concatenate(outs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="fundus-edge:resnet18s",
                   help="fundus-edge:resnet18s | fundus-edge:vit_tiny | torchvision:<name> (e.g. mobilenet_v3_small)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-train", type=int, default=2400)
    p.add_argument("--n-val", type=int, default=400)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--arch-kwargs", default='{"width": 16, "act": "relu6"}',
                   help="JSON keyword arguments for the architecture")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    train(a.arch, a.out, a.n_train, a.n_val, a.epochs, a.seed, json.loads(a.arch_kwargs), a.lr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
