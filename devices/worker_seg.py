"""The ``emulate`` worker's segmentation path (devices/worker.py hands a segmentation bundle here): every photo
through the runtime's own Segmenter (quality check, tiles, stitch, biomarkers; no PNGs written), per photo its
result and, for parity, the working-resolution vessel probability map, written straight into ``outputs.npz``
as ``<artifact>@<photo index>`` (one map in memory at a time, so the peak RSS measured is the device's).

Runtime only (numpy, pillow, one backend): this runs under the device's caps and as an arm64 process.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any


def map_key(artifact: str, index: int) -> str:
    return f"{artifact}@{index}"


def _digesting_backend(inner: Any) -> Any:
    """A backend that passes everything through and keeps a sha256 over the tile batches it is given (reset per
    photo by the caller): whether both machines fed the network bit-identical tiles."""
    from ..runtime.backends import Backend

    class Digesting(Backend):
        name = inner.name

        def __init__(self) -> None:
            super().__init__(inner.model_path, inner.settings, inner.model_bytes)
            self.digest = hashlib.sha256()

        def activate_impl(self) -> None:
            inner.activate()
            self.providers = list(getattr(inner, "providers", []) or [])

        def infer_impl(self, batch: Any) -> Any:
            self.digest.update(batch.tobytes())
            return inner.infer(batch)

        def deactivate_impl(self) -> None:
            inner.deactivate()

    return Digesting()


def run_segmentation(bundle: Any, artifacts: list[str], images: list[str], settings: Any, out_dir: Path,
                     quality: Any = None) -> dict[str, Any]:
    """Per artifact: backend facts and per-photo results; the maps go to ``out_dir / outputs.npz``.
    ``quality``: the image-quality spec (None: the bundle's)."""
    import numpy as np

    from ..runtime.backends import create_backend
    from ..runtime.segment import Segmenter

    per_artifact: dict[str, Any] = {}
    with zipfile.ZipFile(out_dir / "outputs.npz", "w", zipfile.ZIP_STORED) as zf:
        for aid in artifacts:
            art = bundle.artifact(aid)
            backend = _digesting_backend(create_backend(art.format, bundle.path(art), settings,
                                                        bundle.read_artifact(art)))
            backend.activate()
            per_image = []
            with Segmenter(bundle, art, backend, quality) as seg:
                for i, src in enumerate(images):
                    backend.digest = hashlib.sha256()
                    d = seg.segment(src, None).to_dict()
                    if seg.last_probabilities is not None:
                        buf = io.BytesIO()
                        np.save(buf, np.ascontiguousarray(seg.last_probabilities, np.float32))
                        zf.writestr(map_key(aid, i) + ".npy", buf.getvalue())
                        d["input_sha256"] = backend.digest.hexdigest()
                        seg.last_probabilities = None
                    per_image.append(d)
            per_artifact[aid] = {"backend": backend.name, "format": art.format, "precision": art.precision,
                                 "providers": backend.providers, "load_ms": backend.timings.load_ms,
                                 "results": per_image}
    return per_artifact
