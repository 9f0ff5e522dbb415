"""``fundus-edge compare``: the cross-backend parity matrix of a bundle (PyTorch, every artifact, other machines).

Every runner sees the same preprocessed images (files given, by default the CC0 photographs shipped with the
kit, plus seeded synthetic ones); logits are compared pairwise at the bundle's operating point. With
``--save-outputs`` the outputs (and each input's sha256) are written to a ``.npz``; ``--load-outputs`` joins
files written elsewhere, e.g. on an (emulated) device, so the device's numbers are compared with these.
PyTorch runs only where torch is installed; the rest needs only the runtime.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import importlib.util
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

from ..datasets.open_fundus import SAMPLES
from ..errors import ImageError, MissingDependencyError, ParityError, UsageError
from .output import emit


@dataclass
class _Inputs:
    keys: list[str]
    sources: list[str]
    tensors: np.ndarray
    skipped: list[str] = field(default_factory=list)


def _prepare(images: list[str], n_synthetic: int, seed: int, spec: Any) -> _Inputs:
    import numpy as np

    from ..datasets.synthetic import iter_dataset
    from ..runtime import expand_inputs, preprocess

    keys: list[str] = []
    sources: list[str] = []
    tensors: list[np.ndarray] = []
    skipped: list[str] = []
    for path in expand_inputs(images) if images else []:
        try:
            data = Path(path).read_bytes()
            t = preprocess(data, spec).tensor[0]
        except OSError as exc:
            skipped.append(f"{path}: {exc}")
            continue
        except ImageError as exc:
            skipped.append(f"{path}: {exc.code}: {exc}")
            continue
        keys.append(f"{Path(path).name}:{hashlib.sha256(data).hexdigest()[:16]}")
        sources.append(path)
        tensors.append(t)
    cameras = ("desktop", "handheld", "darkred")
    for i, item in enumerate(iter_dataset(n_synthetic, seed, size=512, cameras=cameras)):
        keys.append(f"synthetic:{seed}:{i}")
        sources.append(f"synthetic seed {seed} #{i} ({cameras[i % 3]}, grade {item.grade})")
        tensors.append(preprocess(item.image, spec).tensor[0])
    if not tensors:
        raise UsageError("no usable images to compare on: give image files or directories, or --synthetic N")
    return _Inputs(keys, sources, np.stack(tensors).astype(np.float32), skipped)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for dist in ("fundus-edge", "numpy", "pillow", "onnxruntime", "ai-edge-litert", "tflite-runtime", "torch"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def _run_pytorch(args: argparse.Namespace, bundle: Any, x: np.ndarray, notes: list[str]) -> np.ndarray | None:

    model_ref = args.model or bundle.spec.model.source
    if importlib.util.find_spec("torch") is None:
        if args.model:
            raise MissingDependencyError("torch", "export", "Running the PyTorch model in compare")
        notes.append("pytorch: not run (torch is not installed here; compare the runtime artifacts only)")
        return None
    if not args.model and not (str(model_ref).startswith("reference:") or Path(str(model_ref)).is_file()):
        notes.append(f"pytorch: not run (the bundle's model source {model_ref} is not here; pass --model)")
        return None
    from ..export.load import load_model
    from ..export.validate import torch_outputs

    arch = args.arch or bundle.spec.model.arch
    loaded = load_model(str(model_ref), arch, args.num_classes or bundle.spec.model.num_outputs)
    return torch_outputs(loaded.module, x)


def _run_artifacts(args: argparse.Namespace, bundle: Any, inputs: _Inputs, oset: Any,
                   notes: list[str]) -> dict[str, str]:
    """Each chosen artifact through its runtime backend; returns int8 coverage lines by artifact id."""
    import numpy as np

    from ..runtime.backends import BackendSettings, create_backend
    from ..runtime.preprocess import relayout

    chosen = [bundle.artifact(a) for a in args.artifacts] if args.artifacts else list(bundle.artifacts)
    settings = BackendSettings(threads=args.threads)
    coverage: dict[str, str] = {}
    for art in chosen:
        x = relayout(inputs.tensors, bundle.preprocessing.layout, art.layout)
        try:
            with create_backend(art.format, bundle.path(art), settings, bundle.read_artifact(art)) as backend:
                logits = np.concatenate([backend.infer(np.ascontiguousarray(x[i : i + 1])) for i in range(len(x))])
        except MissingDependencyError as exc:
            if args.artifacts:
                raise
            notes.append(f"{art.id}: not run ({exc})")
            continue
        oset.add(art.id, logits, format=art.format, precision=art.precision, backend=backend.name,
                 layout=art.layout, io_dtype=art.io_dtype,
                 median_infer_ms=round(float(np.median(backend.timings.infer_ms)), 3))
        if art.precision == "int8":
            coverage[art.id] = _coverage_line(bundle, art)
    return coverage


def _coverage_line(bundle: Any, art: Any) -> str:
    if art.format == "tflite":
        from ..runtime.tflite_graph import inspect_tflite

        return inspect_tflite(bundle.path(art)).summary()
    q = bundle.manifest.get("quantization", {}).get(art.id, {})
    if not q:
        return "no quantization summary in the manifest"
    return (f"{q.get('int8_mac_fraction', 0.0):.1%} of MACs in int8 (from the manifest); float ops "
            f"{q.get('float_ops') or 'none'}")


def _local(args: argparse.Namespace, notes: list[str]) -> tuple[Any, dict[str, Any], dict[str, str]]:
    from ..bundle.read import load_bundle
    from ..runtime.parity import OutputSet, default_label, tensor_digest

    bundle = load_bundle(args.bundle)
    images = args.images if args.images else ([str(SAMPLES)] if SAMPLES.is_dir() else [])
    inputs = _prepare(images, args.synthetic, args.seed, bundle.preprocessing)
    notes += [f"skipped {s}" for s in inputs.skipped]
    oset = OutputSet(inputs.keys, [tensor_digest(t) for t in inputs.tensors], meta={
        "bundle_id": bundle.bundle_id, "positive_classes": bundle.positive_classes,
        "threshold": bundle.operating_point.threshold, "label": args.label or default_label(),
        "layout": bundle.preprocessing.layout, "versions": _versions()})
    if not args.no_pytorch:
        ref = _run_pytorch(args, bundle, inputs.tensors, notes)
        if ref is not None:
            oset.add("pytorch", ref, format="pytorch", precision="fp32", backend="torch")
    coverage = _run_artifacts(args, bundle, inputs, oset, notes)
    return oset, {"bundle_id": bundle.bundle_id, "images": inputs.sources}, coverage


def cmd_compare(args: argparse.Namespace) -> int:
    from ..runtime.parity import ParityTolerances, load_outputs, merge, parity_matrix, save_outputs

    if args.bundle is None and not args.load_outputs:
        raise UsageError("compare needs --bundle (to run its artifacts here), --load-outputs, or both")
    notes: list[str] = []
    coverage: dict[str, str] = {}
    head: dict[str, Any] = {}
    loaded = [load_outputs(p) for p in args.load_outputs or []]
    if args.bundle is not None:
        oset, head, coverage = _local(args, notes)
        if args.save_outputs:
            saved = save_outputs(args.save_outputs, oset)
            notes.append(f"outputs of {len(oset.outputs)} runners on {len(oset.keys)} images saved to {saved}")
    else:
        oset, loaded = loaded[0], loaded[1:]
    merges = []
    for other in loaded:
        if other.meta.get("bundle_id") != oset.meta.get("bundle_id"):
            notes.append(f"outputs from {other.label} were made with bundle {other.meta.get('bundle_id')}, "
                         f"these with {oset.meta.get('bundle_id')}")
        oset, m = merge(oset, other)
        merges.append(m)
    tolerances = ParityTolerances(fp32_atol=args.fp32_atol, int8_min_agreement=args.int8_min_agreement)
    payload: dict[str, Any] = {**head, "n": len(oset.keys), "label": oset.label, "runners": oset.runners,
                               "int8_coverage": coverage, "merged": [m.to_dict() for m in merges], "notes": notes}
    if len(oset.outputs) < 2:
        if not args.save_outputs:
            raise UsageError(f"only {len(oset.outputs)} runner could run here ({list(oset.outputs)}); nothing to "
                             "compare. Install another runtime, or --save-outputs and compare on another machine")
        emit(args, {**payload, "matrix": None}, "\n".join([_header(oset), *notes]))
        return 0
    reference = "pytorch" if "pytorch" in oset.outputs else next(
        (n for n, r in oset.runners.items() if r.get("precision") == "fp32"), None)
    matrix = parity_matrix(oset, reference, tolerances)
    payload["matrix"] = matrix.to_dict()
    emit(args, payload, _text(oset, coverage, merges, notes, matrix))
    return 0 if matrix else ParityError.exit_code


def _header(oset: Any) -> str:
    return (f"bundle {oset.meta.get('bundle_id')} on {oset.label}: {len(oset.keys)} images, decisions at threshold "
            f"{float(oset.meta.get('threshold', 0.5)):.4f}")


def _text(oset: Any, coverage: dict[str, str], merges: list[Any], notes: list[str],
          matrix: Any) -> str:
    lines = [_header(oset), "runners:"]
    for name, r in oset.runners.items():
        where = f" (from {r['from']})" if r.get("from") else ""
        ms = f"  {r['median_infer_ms']:.2f} ms/image" if "median_infer_ms" in r else ""
        io = f" {r.get('layout', '')} {r.get('io_dtype', '')} I/O" if r.get("io_dtype") else ""
        lines.append(f"  {name:<24} {r.get('backend', '?')} {r.get('precision', '?')}{io}{ms}{where}")
    if coverage:
        lines.append("int8 coverage:")
        lines += [f"  {k:<24} {v}" for k, v in coverage.items()]
    for m in merges:
        lines.append(f"joined {m.label}: {m.n_common} common images, {m.inputs_differ} with a different "
                     f"preprocessed input, {m.missing} missing there")
    lines.append("checked pairs:")
    lines += ["  " + matrix.pairs[p].row() for p in matrix.checked]
    lines += ["max |logit difference|:", matrix.grid("max_abs"), "decision agreement:",
              matrix.grid("decision_agreement")]
    lines += notes
    lines.append("parity: PASSED" if matrix else "parity: FAILED (" + "; ".join(matrix.failures()) + ")")
    return "\n".join(lines)


def register(sub: Any) -> None:
    c = sub.add_parser("compare", help="cross-backend parity matrix: PyTorch vs every artifact (and other machines)")
    c.add_argument("--bundle", type=Path, help="bundle whose artifacts run here")
    c.add_argument("images", nargs="*", help="image files or directories (default: the kit's CC0 photographs)")
    c.add_argument("--masks", type=Path, metavar="CSV", help="segmentation bundles: expert masks (image,mask[,fov]); "
                   "their photos are compared and ΔAUC/ΔF1 measured")
    c.add_argument("--synthetic", type=int, default=16, help="seeded synthetic images to add (default 16)")
    c.add_argument("--seed", type=int, default=2024)
    c.add_argument("--artifact", action="append", dest="artifacts", metavar="ID",
                   help="artifact id to run; repeat for more (default: all this install can run)")
    c.add_argument("--artifacts", nargs="+", dest="artifacts", help=argparse.SUPPRESS)  # old spelling
    c.add_argument("--model", help="the PyTorch model (default: the bundle's model source, if present here)")
    c.add_argument("--arch", help="architecture for a state_dict --model")
    c.add_argument("--num-classes", type=int)
    c.add_argument("--no-pytorch", action="store_true", help="do not run PyTorch even if it is installed")
    c.add_argument("--save-outputs", type=Path, help="write all outputs here (.npz) for comparison elsewhere")
    c.add_argument("--load-outputs", type=Path, nargs="*", help="join outputs saved on other machines")
    c.add_argument("--label", help="name of this machine in saved outputs (default: the host name)")
    c.add_argument("--fp32-atol", type=float, default=1e-3, help="fp32 pairs: max abs logit difference")
    c.add_argument("--int8-min-agreement", type=float, default=0.9,
                   help="pairs with an int8 side: minimum top-1 and decision agreement (default 0.9)")
    c.add_argument("--threads", type=int, default=0)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compare)

