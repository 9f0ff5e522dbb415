"""Make the small real-photo test subset ``tests/data/open-fundus`` from the full open-fundus set.

    python -m fundus_edge.datasets.make_open_fundus_subset [--root /work/shared/open-fundus] [--out DIR]

Same layout as the full set (``datasets/open_fundus.py``): 6 IDRiD test photographs (as they are, with their
``test.csv`` rows), 6 HRF photographs (2 healthy, 2 DR, 2 glaucoma) downscaled to half size (876x584) with
their field-of-view masks downscaled the same way (box average, thresholded at 50 %), 4 CHASE_DB1
photographs. Deterministic: the same files every time. The licences and citations go in PROVENANCE.md there.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from . import open_fundus

IDRID = ("IDRiD_001.jpg", "IDRiD_010.jpg", "IDRiD_025.jpg", "IDRiD_040.jpg", "IDRiD_062.jpg", "IDRiD_088.jpg")
HRF = ("01_h", "05_h", "02_dr", "09_dr", "03_g", "12_g")
CHASE = ("Image_01L.jpg", "Image_04R.jpg", "Image_08L.jpg", "Image_13R.jpg")


def _half(img: Image.Image) -> Image.Image:
    return img.reduce(2)


def make_subset(root: Path, out: Path) -> list[Path]:
    """Copy / downscale the subset into ``out``; returns the files written."""
    written: list[Path] = []
    (out / "idrid" / "test").mkdir(parents=True, exist_ok=True)
    with (root / "idrid" / "test.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if Path(r["image"]).name in IDRID]
    with (out / "idrid" / "test.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["image", "dr_grade", "dme_risk"])
        w.writeheader()
        w.writerows(rows)
    written.append(out / "idrid" / "test.csv")
    for lic in ("LICENSE.txt", "CC-BY-4.0.txt"):  # IDRiD's own licence files travel with its photographs
        if (root / "idrid" / lic).is_file():
            shutil.copyfile(root / "idrid" / lic, out / "idrid" / lic)
            written.append(out / "idrid" / lic)
    for name in IDRID:
        dst = out / "idrid" / "test" / name
        shutil.copyfile(root / "idrid" / "test" / name, dst)
        written.append(dst)
    for sub in ("images", "fov"):
        (out / "hrf" / sub).mkdir(parents=True, exist_ok=True)
    for stem in HRF:
        photo = Image.open(root / "hrf" / "images" / f"{stem}.jpg").convert("RGB")
        dst = out / "hrf" / "images" / f"{stem}.jpg"
        _half(photo).save(dst, quality=92)
        mask = np.asarray(Image.open(root / "hrf" / "fov" / f"{stem}.png").convert("L"), np.float32)
        small = np.asarray(_half(Image.fromarray(mask.astype(np.uint8))), np.float32)
        mdst = out / "hrf" / "fov" / f"{stem}.png"
        Image.fromarray(((small >= 127.5) * 255).astype(np.uint8), "L").save(mdst, optimize=True)
        written += [dst, mdst]
    (out / "chase_db1" / "images").mkdir(parents=True, exist_ok=True)
    for name in CHASE:
        dst = out / "chase_db1" / "images" / name
        shutil.copyfile(root / "chase_db1" / "images" / name, dst)
        written.append(dst)
    return written


DEMO_CALIB = 64  # IDRiD-train photos for int8 calibration (seeded pick)


def _save_width(src: Path, dst: Path, width: int) -> Path:
    with Image.open(src) as im:
        img = im.convert("RGB")
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.Resampling.LANCZOS)
    dst.parent.mkdir(parents=True, exist_ok=True)
    img.save(dst, quality=90)
    return dst


def make_demo_subset(root: Path, out: Path) -> list[Path]:
    """The demo's copy (``open_fundus.DEMO_SUBSET``): every IDRiD test photograph and 64 seeded IDRiD-train ones at
    960 px wide (from 1280), with their csv rows, and all 45 HRF photographs at half size (876x584)."""
    import random

    written: list[Path] = []
    for split, pick in (("test", None), ("train", DEMO_CALIB)):
        with (root / "idrid" / f"{split}.csv").open(newline="") as fh:
            rows = list(csv.DictReader(fh))
        if pick is not None:
            rows = sorted(random.Random(0).sample(rows, pick), key=lambda r: r["image"])
        (out / "idrid").mkdir(parents=True, exist_ok=True)
        with (out / "idrid" / f"{split}.csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["image", "dr_grade", "dme_risk"])
            w.writeheader()
            w.writerows(rows)
        written.append(out / "idrid" / f"{split}.csv")
        written += [_save_width(root / "idrid" / r["image"], out / "idrid" / r["image"], 960) for r in rows]
    for lic in ("LICENSE.txt", "CC-BY-4.0.txt"):
        if (root / "idrid" / lic).is_file():
            shutil.copyfile(root / "idrid" / lic, out / "idrid" / lic)
            written.append(out / "idrid" / lic)
    for photo in sorted((root / "hrf" / "images").glob("*.jpg")):
        written.append(_save_width(photo, out / "hrf" / "images" / photo.name, 876))
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="the full open-fundus folder (default: datasets.open_fundus)")
    ap.add_argument("--out", default=None,
                    help="default: tests/data/open-fundus (tests/data/open-fundus-demo with --demo)")
    ap.add_argument("--demo", action="store_true", help="make the demo's copy instead of the test subset")
    args = ap.parse_args(argv)
    args.out = args.out or str(open_fundus.DEMO_SUBSET if args.demo else open_fundus.SUBSET)
    root = open_fundus.find_root(args.root)
    if root.resolve() == Path(args.out).resolve():
        print(f"no full open-fundus set found (only the subset at {root}); pass --root", file=sys.stderr)
        return 2
    files = (make_demo_subset if args.demo else make_subset)(root, Path(args.out))
    print(f"wrote {len(files)} files under {args.out} from {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
