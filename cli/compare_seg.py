"""``fundus-edge compare`` on a segmentation bundle: each artifact's vessel masks against the reference's on the
same photos (gate/seg_compare.py): per-photo mask Dice, largest probability difference and biomarker change;
with ``--masks CSV`` (image,mask[,fov]) also ΔAUC and ΔF1 against the expert masks. Exit 11 when a pair is
outside the bundle's segmentation-gate criteria. Torch-free."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import ParityError, UsageError
from .output import emit


def cmd_compare_seg(args: argparse.Namespace) -> int:
    from ..bundle.read import load_bundle
    from ..datasets.masks import read_masks_csv
    from ..datasets.open_fundus import SAMPLES
    from ..gate.seg_compare import compare_segmentation, compare_text
    from ..runtime.backends import BackendSettings
    from ..runtime.screen import expand_inputs

    if args.save_outputs or args.load_outputs:
        raise UsageError("--save-outputs/--load-outputs do not take segmentation bundles yet; for a device's "
                         "masks against this machine's, run 'fundus-edge emulate --device D --bundle B PHOTOS'")
    images: list[Any]
    if getattr(args, "masks", None):
        if args.images:
            raise UsageError("give photos, or --masks CSV (its photos are used), not both")
        images = read_masks_csv(args.masks)
    else:
        images = expand_inputs(args.images or ([str(SAMPLES)] if SAMPLES.is_dir() else []))
    if not images:
        raise UsageError("no photos to compare on: give image files or directories, or --masks CSV")
    doc = compare_segmentation(load_bundle(args.bundle), images, args.artifacts, BackendSettings(threads=args.threads))
    doc["notes"] = ["pytorch: not run for segmentation bundles (the build checked the fp32 file against PyTorch on "
                    "real tiles; see the report's export parity)"] if args.model else []
    text = compare_text(doc) + "".join(f"\nnote: {n}" for n in doc["notes"])
    emit(args, doc, text)
    return 0 if doc["passed"] else ParityError.exit_code
