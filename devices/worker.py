"""The child process of ``fundus-edge emulate``: screens images with a bundle and writes outputs to disk.

Runs the same way natively (under resource caps) and as an arm64 process under QEMU, so it only uses the
standard library before the caps are in place, and the runtime after (numpy, pillow, one backend; never
torch or onnx). Usage: ``python -m fundus_edge.devices.worker REQUEST.json``; it writes ``result.json`` and
``outputs.npz`` (one (N, C) float32 array of model outputs per artifact, NaN rows for images that failed;
for a segmentation bundle one working-resolution probability map per artifact and photo, devices/worker_seg.py)
into the request's ``out_dir``.

Request fields: ``bundle``, ``artifacts`` (ids), ``images``, ``threads``, ``providers``, ``out_dir``,
``quality`` (false: no image-quality check, every decoded image is inferred, as the clinical gate scores it), and
``caps``: ``cores`` (CPU affinity), ``rlimit_as_bytes`` (RLIMIT_AS), ``cgroup_procs`` (a cgroup v1
``cgroup.procs`` file to join before anything big is allocated).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any


def apply_caps(caps: dict[str, Any]) -> dict[str, Any]:
    applied: dict[str, Any] = {}
    if caps.get("cgroup_procs"):
        with open(caps["cgroup_procs"], "w") as fh:
            fh.write(str(os.getpid()))
        applied["cgroup"] = str(Path(caps["cgroup_procs"]).parent)
    if caps.get("cores"):
        os.sched_setaffinity(0, set(caps["cores"]))
        applied["cores"] = sorted(os.sched_getaffinity(0))
    if caps.get("rlimit_as_bytes"):
        limit = int(caps["rlimit_as_bytes"])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        applied["rlimit_as_bytes"] = limit
    return applied


def _recording_backend(inner: Any) -> Any:
    """Wrap a runtime backend so that every output (and a digest of every input) is kept, through the contract."""
    import hashlib

    from ..runtime.backends import Backend

    class Recording(Backend):
        name = inner.name

        def __init__(self) -> None:
            super().__init__(inner.model_path, inner.settings, inner.model_bytes)
            self.outputs: list[Any] = []
            self.input_sha256: list[str] = []

        def activate_impl(self) -> None:
            inner.activate()
            self.providers = list(getattr(inner, "providers", []) or [])

        def infer_impl(self, batch: Any) -> Any:
            out = inner.infer(batch)
            self.input_sha256.append(hashlib.sha256(batch.tobytes()).hexdigest())
            self.outputs.append(out)
            return out

        def deactivate_impl(self) -> None:
            inner.deactivate()

    return Recording()


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Screen (a segmentation bundle: segment) every image with every requested artifact through the runtime."""
    t_start = time.perf_counter()
    applied = apply_caps(request.get("caps") or {})
    import platform
    from dataclasses import replace

    from ..bundle.read import load_bundle
    from ..runtime.backends import BackendSettings

    out_dir = Path(request["out_dir"])
    bundle = load_bundle(request["bundle"], verify=bool(request.get("verify", True)))
    settings = BackendSettings(threads=int(request.get("threads", 1)), providers=tuple(request.get("providers", ())))
    images = [str(p) for p in request["images"]]
    result: dict[str, Any] = {"machine": platform.machine(), "python": platform.python_version(),
                              "caps": applied, "versions": _versions(), "artifacts": {}}
    # quality false: no image-quality check, every decoded image is inferred (as the clinical gate scores it)
    quality = None if request.get("quality", True) else replace(bundle.quality, enabled=False)
    if bundle.spec.task == "segmentation":
        from .worker_seg import run_segmentation

        result["artifacts"] = run_segmentation(bundle, request["artifacts"], images, settings, out_dir, quality)
    else:
        result["artifacts"] = _run_classification(bundle, request["artifacts"], images, settings, out_dir,
                                                  quality)
    from .caps import vm_hwm_kb

    result["vm_hwm_kb"] = vm_hwm_kb()
    result["wall_s"] = time.perf_counter() - t_start
    return result


def _run_classification(bundle: Any, artifacts: list[str], images: list[str], settings: Any, out_dir: Path,
                        quality: Any = None) -> dict[str, Any]:
    """Screen every image with every artifact through the runtime's Screener; (N, C) outputs to outputs.npz."""
    import numpy as np

    from ..runtime.backends import create_backend
    from ..runtime.screen import Screener

    per_artifact: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    n_out = len(bundle.class_names)
    for aid in artifacts:
        art = bundle.artifact(aid)
        backend = _recording_backend(create_backend(art.format, bundle.path(art), settings,
                                                    bundle.read_artifact(art)))
        backend.activate()
        rows, per_image = [], []
        with Screener(bundle, art, backend, quality) as screener:
            for src in images:
                before = len(backend.outputs)
                r = screener.screen(src)
                d = r.to_dict()
                if len(backend.outputs) > before:
                    rows.append(np.asarray(backend.outputs[-1], np.float32).reshape(-1))
                    d["input_sha256"] = backend.input_sha256[-1]
                else:
                    rows.append(np.full((n_out,), np.nan, np.float32))
                per_image.append(d)
        outputs[aid] = np.stack(rows) if rows else np.zeros((0, n_out), np.float32)
        per_artifact[aid] = {"backend": backend.name, "format": art.format, "precision": art.precision,
                             "providers": backend.providers, "load_ms": backend.timings.load_ms,
                             "results": per_image}
    np.savez(out_dir / "outputs.npz", **outputs)
    return per_artifact


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for dist in ("numpy", "pillow", "onnxruntime", "ai-edge-litert", "tflite-runtime"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fundus_edge.devices.worker REQUEST.json", file=sys.stderr)
        return 2
    request = json.loads(Path(args[0]).read_text())
    out_dir = Path(request["out_dir"])
    try:
        result = run(request)
    except MemoryError:
        (out_dir / "error.json").write_text(json.dumps({"code": "memory", "message": "MemoryError"}))
        return 75
    except Exception as exc:
        (out_dir / "error.json").write_text(json.dumps({"code": type(exc).__name__, "message": str(exc)}))
        raise
    tmp = out_dir / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.replace(out_dir / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
