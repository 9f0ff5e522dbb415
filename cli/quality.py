"""``fundus-edge quality``: image-quality measures of photographs, and per-camera calibration of the thresholds.

    fundus-edge quality [--bundle B | --spec S] [--json] IMAGE|DIR ...
    fundus-edge quality calibrate --good DIR --bad DIR [--bundle B | --spec S] [--json] [--out spec.json]

Both run with the device install (numpy + pillow); calibration writes a spec for ``build --quality-spec``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ImageError, UsageError
from .output import refuse_word_as_path

USAGE = ("fundus-edge quality [--bundle B | --spec S] [--json] IMAGE|DIR ...\n"
         "       fundus-edge quality calibrate --good DIR --bad DIR [--bundle B | --spec S] [--json] "
         "[--out spec.json] [--target-pass 0.97]")


def register(sub: Any) -> None:
    q = sub.add_parser(
        "quality", help="image-quality measures of photographs; 'quality calibrate' fits thresholds to a camera",
        usage=USAGE, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(q)
    q.add_argument("inputs", nargs=argparse.REMAINDER, help="image files or directories, or 'calibrate ...'")
    q.set_defaults(func=cmd_quality)


def _add_common(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--bundle", type=Path, help="use this bundle's preprocessing and quality spec")
    src.add_argument("--spec", type=Path, help="a quality spec JSON (from 'quality calibrate --out')")
    p.add_argument("--json", action="store_true")


def images_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fundus-edge quality", usage=USAGE)
    _add_common(p)
    p.add_argument("inputs", nargs="+", help="image files or directories")
    return p


def calibrate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fundus-edge quality calibrate", usage=USAGE,
                                description="Fit quality thresholds to one camera from labelled photographs.")
    _add_common(p)
    p.add_argument("--good", type=Path, required=True, nargs="+",
                   help="folder(s) of acceptable photographs from this camera")
    p.add_argument("--bad", type=Path, required=True, nargs="+",
                   help="folder(s) of ungradable or non-fundus photographs")
    p.add_argument("--out", type=Path, help="write the calibrated quality spec (JSON) here")
    p.add_argument("--target-pass", type=float, default=0.97,
                   help="share of the good photographs that must pass every measure (default 0.97)")
    p.add_argument("--quantile", type=float, default=0.01,
                   help="tail quantile of the good photographs a bound may reach (default 0.01)")
    return p


def _specs(args: argparse.Namespace) -> tuple[Any, Any]:
    """(quality spec, preprocessing spec) from --bundle, --spec or the defaults."""
    from ..runtime.preprocess import PreprocessSpec
    from ..runtime.quality import QualitySpec, load_quality_spec

    if args.bundle:
        from ..bundle.read import load_bundle

        b = load_bundle(args.bundle)
        return b.quality, b.preprocessing
    if args.spec:
        return load_quality_spec(args.spec), PreprocessSpec()
    return QualitySpec(), PreprocessSpec()


def _merge(outer: argparse.Namespace, inner: argparse.Namespace) -> argparse.Namespace:
    for key in ("bundle", "spec"):
        if getattr(outer, key) is not None:
            if getattr(inner, key) is not None:
                raise UsageError(f"--{key} given twice")
            setattr(inner, key, getattr(outer, key))
    if inner.bundle is not None and inner.spec is not None:
        raise UsageError("give --bundle or --spec, not both")
    inner.json = bool(inner.json or outer.json)
    outer.json = inner.json  # the CLI's error handler prints JSON errors when asked
    return inner


def cmd_quality(args: argparse.Namespace) -> int:
    rest = list(args.inputs)
    if rest and rest[0] == "calibrate":
        return _cmd_calibrate(_merge(args, calibrate_parser().parse_args(rest[1:])))
    if not rest:
        raise UsageError("give image files or directories, or 'calibrate --good DIR --bad DIR'")
    refuse_word_as_path(rest[0], ("calibrate",), "quality")
    return _cmd_measure(_merge(args, images_parser().parse_args(rest)))


def _cmd_measure(args: argparse.Namespace) -> int:
    from ..runtime import expand_inputs
    from ..runtime.quality import MEASURES, assess_source

    qspec, pspec = _specs(args)
    results: list[dict[str, Any]] = []
    lines: list[str] = []
    for src in expand_inputs(args.inputs):
        name = Path(src).name
        try:
            q, pre = assess_source(src, qspec, pspec)
        except ImageError as exc:
            results.append({"source": src, "ok": False, "error": {"code": exc.code, "message": str(exc)}})
            lines.append(f"{name:<28} ERROR      {exc.code}: {exc}")
            continue
        results.append({"source": src, "ok": True, "quality": q.to_dict(), "fov": pre.original_fov.to_dict(),
                        "timings_ms": {**{k: round(v, 2) for k, v in pre.timings_ms.items()},
                                       "quality": round(q.timings_ms, 2)}})
        verdict = "GRADABLE" if q else "UNGRADABLE"
        lines.append(f"{name:<28} {verdict:<10} score {q.score:.3f}  ({q.timings_ms:.1f} ms)")
        for reason in q.reasons:
            lines.append(f"    - {reason}")
        if q.hint:
            lines.append(f"    hint: {q.hint}")
        shown = [f"{k}={q.measures[k]:.3g}" + ("*" if k in q.failed else "") for k in MEASURES if k in q.measures]
        for i in range(0, len(shown), 6):
            lines.append("    " + "  ".join(shown[i: i + 6]))
    n_err = sum(1 for r in results if not r["ok"])
    n_ungradable = sum(1 for r in results if r["ok"] and not r["quality"]["gradable"])
    summary = {"n": len(results), "gradable": len(results) - n_err - n_ungradable, "ungradable": n_ungradable,
               "errors": n_err}
    lines.append(f"{summary['n']} images: {summary['gradable']} gradable, {n_ungradable} ungradable, "
                 f"{n_err} unreadable (* = out of bounds; spec: {qspec.source})")
    if args.json:
        print(json.dumps({"results": results, "summary": summary, "spec": qspec.to_dict()}, indent=2))
    else:
        print("\n".join(lines))
    return ImageError.exit_code if n_err else 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from ..runtime import expand_inputs
    from ..runtime.quality_calibration import calibrate, measure_images

    qspec, pspec = _specs(args)
    good_files = expand_inputs(args.good)
    bad_files = expand_inputs(args.bad)

    def progress(what: str) -> Any:
        step = [0]

        def cb(done: int, total: int) -> None:
            if done * 10 // total > step[0] or done == total:
                step[0] = done * 10 // total
                print(f"  measuring {what}: {done}/{total}", file=sys.stderr, flush=True)

        return cb

    good = measure_images(good_files, qspec, pspec, progress("good"))
    bad = measure_images(bad_files, qspec, pspec, progress("bad"))
    result = calibrate(good, bad, qspec, target_pass=args.target_pass, quantile=args.quantile)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result.spec.to_dict(), indent=2) + "\n")
    if args.json:
        print(json.dumps({**result.to_dict(), "out": str(args.out) if args.out else None}, indent=2))
    else:
        print(result.text())
        print(f"spec written to {args.out}; put it in a bundle with 'fundus-edge build --quality-spec {args.out}'"
              if args.out else "(pass --out spec.json to save the calibrated spec)")
    return 0
