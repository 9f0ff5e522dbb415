"""Field reliability at the sizes issue 7 asks for (the tests run the same code small):

  fuzz    >= 10,000 hypothesis-mutated real and synthetic images through the screener (in a worker process, so
          a native crash is counted, not fatal): uncaught exceptions, crashes and hangs (must be 0) and the
          worker's RSS growth, median of the last 1,000 cases against cases 1,000-2,000 (must be < 5 MB)
  kill    20 SIGKILLs at random moments during a 1,000-image watch-mode batch, restarted until done:
          lost / duplicated images (must be 0 / 0) and PRAGMA integrity_check (must be ok)
  tamper  a signed bundle under require_signature: every byte of manifest.json and manifest.sig flipped,
          200 bytes of every other file, truncation/extension/deletion, key swaps: accepted (must be 0)
  patients  20 photos screened for 5 patients (IDs from a file), twice: rows (must be 100: one per photo and
          patient, none added by the second round) and results verify (must pass)
  partial  a watcher with --after move while 10 files of each format (WebP, TIFF, BMP, PNG, DICOM, and a JPEG
          paused right after its EXIF thumbnail) are written in two halves with a 0.5-1.5 s pause: errors and
          files parked in failed/ (must be 0 / 0), every file screened
  subfolders  a camera card (5 DCIM/1NNCAM folders of .JPG, .jpe and trailing-space names, hidden files, notes,
          a folder four levels down): every image taken (must be 50 ok) and every other entry reported skipped

Usage (toolchain environment; a bundle from 'fundus-edge build' or 'fundus-edge demo'):

  python benchmarks/field_reliability.py all --bundle demo-out/bundle [--out field-reliability.json]
  python benchmarks/field_reliability.py fuzz --bundle B --n 10000
  python benchmarks/field_reliability.py kill --bundle B --images 1000 --kills 20

Exits 1 when any of the "must" conditions above fails.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from field_cases import run_partial_case, run_patients_case, run_subfolder_case
from reliability import run_fuzz, run_kill_test, run_tamper_sweep

HERE = Path(__file__).resolve().parent


def log(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def fuzz(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from fundus_edge.datasets.badinputs import fuzz_seeds

    real = sorted((HERE.parent / "tests" / "data" / "fundus").glob("*.jpg"))
    seeds = fuzz_seeds(real, size=256)
    log(f"fuzz: {args.n} cases over {len(seeds)} seeds ({len(real)} real photographs, as they are and small)")
    r = run_fuzz(args.n, seeds, bundle=args.bundle, seed=args.seed, failures_dir=work / "fuzz-failures", log=log)
    r["rss_growth_mb"] = round(r["rss_growth_mib"] * 1.048576, 2)
    r["passed"] = r["cases"] >= args.n and r["uncaught"] == 0 and r["rss_growth_mb"] < 5.0
    log(f"fuzz: {r['cases']} cases, {r['uncaught']} uncaught, worker RSS median {r['rss_mib_median_cases_1000_2000']} "
        f"-> {r['rss_mib_median_last_1000']} MiB "
        f"(growth {r['rss_growth_mb']} MB, max {r['rss_mib_max']} MiB), worker starts {r['worker_starts']}, "
        f"{r['seconds']} s")
    return r


def kill(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if not args.bundle:
        raise SystemExit("kill needs --bundle")
    log(f"kill: {args.kills} SIGKILLs during a {args.images}-image watch batch")
    r = run_kill_test(Path(args.bundle), work / "kill", n_images=args.images, kills=args.kills, seed=args.seed,
                      log=log)
    r["passed"] = (r["kills"] == args.kills and r["lost"] == 0 and r["duplicated"] == 0 and r["unexpected"] == 0
                   and r["integrity_check"] == ["ok"] and r["left_in_inbox"] == 0)
    log(f"kill: {r['kills']} kills, {r['runs']} runs, {r['images']} images: {r['lost']} lost, {r['duplicated']} "
        f"duplicated, integrity_check {r['integrity_check']}, {r['seconds']} s")
    return r


def tamper(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if not args.bundle:
        raise SystemExit("tamper needs --bundle")
    log("tamper: signed bundle under require_signature")
    r = run_tamper_sweep(Path(args.bundle), work / "tamper", positions_per_file=args.positions, seed=args.seed,
                         log=log)
    r["passed"] = r["accepted"] == 0 and r["audited_refusals"] == r["refused"] and r["audit_chain_ok"]
    log(f"tamper: {r['attempts']} attempts, {r['refused']} refused, {r['accepted']} accepted, "
        f"{r['audited_refusals']} refusals audited, {r['seconds']} s")
    return r


def _real() -> list[Path]:
    return sorted((HERE.parent / "tests" / "data" / "fundus").glob("*.jpg"))


def patients(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if not args.bundle:
        raise SystemExit("patients needs --bundle")
    r = run_patients_case(Path(args.bundle), work / "patients", _real(), log=log)
    r["passed"] = r["rows"] == r["expected_rows"] == r["distinct_photo_patient"] and r["verify_ok"]
    log(f"patients: {r}")
    return r


def partial(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if not args.bundle:
        raise SystemExit("partial needs --bundle")
    r = run_partial_case(Path(args.bundle), work / "partial", _real(), seed=args.seed, log=log)
    r["passed"] = r["errors"] == 0 and r["parked_in_failed"] == 0 and r["ok"] == r["files"]
    return r


def subfolders(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if not args.bundle:
        raise SystemExit("subfolders needs --bundle")
    r = run_subfolder_case(Path(args.bundle), work / "subfolders", _real(), log=log)
    # skipped: per folder a note and a hidden file, and one folder four levels down
    r["passed"] = r["ok"] == r["expected"] == r["rows"] and r["skipped"] == 11
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["fuzz", "kill", "tamper", "patients", "partial", "subfolders", "all"])
    p.add_argument("--bundle", help="bundle directory (required for kill and tamper; fuzz without it: decoder only)")
    p.add_argument("--n", type=int, default=10_000, help="fuzz cases")
    p.add_argument("--images", type=int, default=1_000)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--positions", type=int, default=200, help="tamper: byte flips per bundle file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    p.add_argument("--out", type=Path, help="write the JSON results here too")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fe-field-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                                   "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for name, fn in (("fuzz", fuzz), ("kill", kill), ("tamper", tamper), ("patients", patients),
                         ("partial", partial), ("subfolders", subfolders)):
            if args.what in (name, "all"):
                results[name] = fn(args, work)
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if all(v.get("passed") for v in results.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    sys.exit(main())
