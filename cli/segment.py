"""Segmentation bundles on the command line: ``screen`` (vessel mask + overlay PNGs and biomarkers per photo;
honours --device/--device-config and the trust policy), ``info``, ``check`` (re-gate on a masks CSV), ``bench``
(cli/bench_seg.py) and ``compare`` (cli/compare_seg.py); ``emulate`` and ``package`` take them through their own
handlers. Commands that do not support them yet say so (no traceback).

``screen --out-dir DIR`` (default ``./fundus-edge-vessels``): ``<photo stem>.vessels.png`` (binary mask, photo
pixels) and ``<photo stem>.overlay.png`` (vessels tinted on the photo) per photo. Torch-free."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import ImageError, UsageError
from .output import emit

DEFAULT_OUT_DIR = Path("fundus-edge-vessels")
SUPPORTED = ("screen", "info", "check", "quality", "keys", "emulate", "package")


def bundle_task(bundle: Path) -> str | None:
    """The ``task`` a bundle's manifest declares (unverified: only to route the command), or None."""
    from ..runtime.safe_io import UnsafeFileError, read_regular

    try:  # a regular file only, read with a cap: a FIFO or /dev/zero named manifest.json must not block routing
        data = json.loads(read_regular(Path(bundle) / "manifest.json", 16 << 20))
    except (OSError, ValueError, RecursionError, UnsafeFileError):  # the bundle reader reports these properly
        return None
    task = data.get("task") if isinstance(data, dict) else None
    return task if isinstance(task, str) else None


def segmentation_command(args: argparse.Namespace) -> Callable[[argparse.Namespace], int] | None:
    """The handler of ``args`` for a segmentation bundle (None: not one, or the command handles it itself).
    Raises :class:`UsageError` for commands that do not support segmentation bundles yet."""
    bundle = getattr(args, "bundle", None)
    if bundle is None or bundle_task(bundle) != "segmentation":
        return None
    from .bench_seg import cmd_bench_seg
    from .compare_seg import cmd_compare_seg

    handlers = {"screen": cmd_screen_seg, "info": cmd_info_seg, "check": cmd_check_seg, "bench": cmd_bench_seg,
                "compare": cmd_compare_seg}
    if args.command in handlers:
        return handlers[args.command]
    if args.command in SUPPORTED:
        return None
    takes = ", ".join(f"'{c}'" for c in (*handlers, *SUPPORTED))
    raise UsageError(f"'{args.command}' does not support segmentation bundles yet ({bundle} is a vessel "
                     f"segmentation bundle); {takes} do")


def _screen_line(r: dict[str, Any]) -> str:
    if not r["ok"]:
        return f"{r['source']}: ERROR {r['error']['message']}"
    if r.get("decision") == "ungradable":
        return f"{r['source']}: ungradable ({'; '.join(r['quality'].get('reasons', []))})"
    b = r["biomarkers"]
    return (f"{r['source']}: vessel density {b['density']:.4f}, fractal dimension {b['fractal_dimension']:.3f} "
            f"(r2 {b['fractal_r2']:.3f}); mask {r['mask']}, overlay {r['overlay']}")


# options that need the field session (cli/field.py: result store, watch mode, patient fields); without them the
# trust policy (--device-config, --trusted-keys, --require-signature) and the device's choices are handled here
FIELD_ONLY = ("store", "watch", "patient_id", "patient_id_file", "eye", "audit_log")


def _verified(args: argparse.Namespace) -> tuple[Any, Any]:
    """The bundle, verified against the trust policy of --device-config / --trusted-keys / --require-signature."""
    from ..bundle.signing import TrustPolicy, verify_bundle
    from .output import warn

    base = TrustPolicy.from_config(args.device_config) if getattr(args, "device_config", None) else TrustPolicy()
    policy = base.tightened(getattr(args, "trusted_keys", None), getattr(args, "require_signature", False))
    bundle, status = verify_bundle(args.bundle, policy)
    if policy.active and not status.signed:
        warn(f"bundle {args.bundle} is not signed; it was accepted because signatures are not required "
             "(--require-signature)")
    return bundle, status


def cmd_screen_seg(args: argparse.Namespace) -> int:
    from ..runtime.screen import expand_inputs
    from ..runtime.segment import load_segmenter
    from .choices import screen_choices

    if any(getattr(args, k, None) for k in FIELD_ONLY):  # stored rows with biomarkers (runtime/field/segmentation.py)
        from .field import screen_field

        return screen_field(args)
    if not args.inputs:
        raise UsageError("give image files or directories to segment")
    sources = expand_inputs(args.inputs)
    out_dir = args.out_dir or DEFAULT_OUT_DIR
    bundle, status = _verified(args)
    artifact, fmt, settings = screen_choices(args, lambda: bundle)  # --device / --device-config pick here
    with load_segmenter(bundle, artifact=artifact, fmt=fmt, precision=args.precision, settings=settings) as seg:
        results = []
        for s in sources:  # --jsonl: each result as it is made
            results.append(seg.segment(s, out_dir).to_dict())
            if getattr(args, "jsonl", False):
                print(json.dumps({"result": results[-1]}), flush=True)
        head = f"bundle {seg.bundle.bundle_id}, artifact {seg.artifact.id} ({seg.backend.name}), segmentation"
        ids = {"bundle_id": seg.bundle.bundle_id, "artifact": seg.artifact.id, "backend": seg.backend.name}
    n_err = sum(not r["ok"] for r in results)
    summary = {"n": len(results), "segmented": sum(r.get("decision") == "segmented" for r in results),
               "ungradable": sum(r.get("decision") == "ungradable" for r in results), "errors": n_err}
    payload = {**ids, "task": "segmentation", "out_dir": str(out_dir), "results": results, "summary": summary,
               "signature": status.to_dict()}
    lines = [head, *map(_screen_line, results), f"{summary['segmented']} segmented, {summary['ungradable']} "
             f"ungradable, {n_err} errors; masks and overlays in {out_dir}"]
    if getattr(args, "jsonl", False):
        print(json.dumps({"summary": summary}), flush=True)
    else:
        emit(args, payload, "\n".join(lines))
    return ImageError.exit_code if n_err else 0


def cmd_info_seg(args: argparse.Namespace) -> int:
    from ..bundle.read import load_bundle

    b = load_bundle(args.bundle)
    m, spec = b.manifest, b.spec
    dense = spec.dense
    assert dense is not None  # the manifest's checks guarantee it for a segmentation bundle
    lines = [f"bundle {b.bundle_id} (schema {m['schema_version']}, task segmentation), created {m.get('created')},"
             f" all {len(m['files'])} files verified",
             f"model: {m['model'].get('arch')} channels {b.class_names}; output {m['output']['shape']} pixel logits",
             f"dense preprocessing: FOV {dense.fov_diameter} px across, {dense.color}, CLAHE {dense.clahe}, tiles "
             f"{dense.tile} (overlap {dense.overlap})",
             f"vessel threshold: {b.operating_point.threshold:.4f} ({b.operating_point.rule})",
             f"gate: {'passed' if m['gate']['passed'] else 'FAILED'}"]
    for a in b.artifacts:
        mark = " (default)" if a.id == m.get("default_artifact") else ""
        lines.append(f"  {a.id:<11} {a.path:<18} {a.format}/{a.precision} {a.layout} {a.io_dtype} I/O{mark}")
    emit(args, {"bundle_id": b.bundle_id, "task": "segmentation", "manifest": m, "verified": True},
         "\n".join(lines))
    return 0


def cmd_check_seg(args: argparse.Namespace) -> int:
    from ..bundle.read import load_bundle
    from ..datasets.masks import read_masks_csv
    from ..gate.segmentation import SegmentationCriteria, evaluate, judge, report_md
    from ..runtime.backends import installed_formats
    from .choices import backend_settings

    b = load_bundle(args.bundle)
    assert b.spec.dense is not None and b.spec.gate is not None
    here = installed_formats()  # by default, artifacts whose backend is not installed here are skipped (said)
    ids = args.artifacts or [a.id for a in b.artifacts if a.format in here]
    skipped = [f"{a.id}: not checked (no {a.format} backend installed here)" for a in b.artifacts
               if not args.artifacts and a.format not in here]
    reference = b.spec.operating_point.locked_on or ids[0]
    if reference not in ids:
        ids = [reference, *ids]
    crit = {k: v for k, v in b.spec.gate.criteria.items() if k != "kind"}
    files: dict[str, Path | tuple[str, Path]] = {i: (b.artifact(i).format, b.path(b.artifact(i))) for i in ids}
    evals = evaluate(files, read_masks_csv(args.val), b.spec.dense, backend_settings(args))
    gate = judge(evals, reference, b.operating_point.threshold, SegmentationCriteria(**crit))
    emit(args, {"bundle_id": b.bundle_id, "task": "segmentation", **gate, "skipped": skipped},
         "\n".join([report_md(gate).strip(), *skipped]))
    return 0 if gate["passed"] else 8
