"""Field commands and options: the result store, watch mode, patient fields and the trust policy on
``screen``; ``results export|verify``; ``keys generate|verify``; ``build --sign-key``.

Registered through ``COMMAND_MODULES`` in cli.py. Heavy imports stay inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ImageError, UsageError
from .choices import decode_limits_for, pipeline_settings, screen_choices, use_pipeline
from .output import emit, printable, screening_line, warn

FIELD_SCREEN_OPTIONS = ("store", "watch", "trusted_keys", "require_signature", "device_config", "patient_id",
                        "patient_id_file", "eye", "audit_log")


def wants_field(args: argparse.Namespace) -> bool:
    """Whether ``screen`` was given any option handled here."""
    return any(getattr(args, k, None) for k in FIELD_SCREEN_OPTIONS)


def passphrase_from_env(var: str | None) -> bytes | None:
    """The passphrase held in environment variable ``var`` (never taken on the command line: argv is visible
    to every user of the machine)."""
    if not var:
        return None
    value = os.environ.get(var)
    if not value:
        raise UsageError(f"environment variable {var} (named by the passphrase option) is not set or empty")
    return value.encode()


def state_dir() -> Path:
    """Where the audit log goes when neither --audit-log nor --store says: $FUNDUS_EDGE_STATE_DIR, else
    $XDG_STATE_HOME/fundus-edge, else ~/.local/state/fundus-edge."""
    if os.environ.get("FUNDUS_EDGE_STATE_DIR"):
        return Path(os.environ["FUNDUS_EDGE_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fundus-edge"


def default_audit_path(store: Path) -> Path:
    """``results.db`` -> ``results.audit.jsonl`` next to it."""
    return store.with_name(store.stem + ".audit.jsonl")


# ----------------------------------------------------------------------------------------------- screen
def _policy(args: argparse.Namespace) -> Any:
    from ..bundle.signing import TrustPolicy

    base = TrustPolicy.from_config(args.device_config) if args.device_config else TrustPolicy()
    return base.tightened(args.trusted_keys, args.require_signature)


def _audit_path(args: argparse.Namespace, policy: Any) -> Path | None:
    if args.audit_log:
        return Path(args.audit_log)
    if args.store:
        return default_audit_path(Path(args.store))
    if policy.active:
        return state_dir() / "audit.jsonl"
    return None


@contextmanager
def stop_on_signals(stop: threading.Event, reason: list[str]) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop`` (the work in hand is finished first); previous handlers come back."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        reason.append(signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _line(rec: Any) -> str:
    text = screening_line(rec)
    if rec.extra.get("stored"):
        text += f"  [stored result #{rec.id} from {rec.created_at}]"
    if rec.extra.get("laterality_mismatch"):
        text += " WARNING: --eye differs from the laterality in the DICOM file"
    return text


def _result_dict(rec: Any, show_patient: bool) -> dict[str, Any]:
    d = rec.to_dict(include_patient=show_patient)
    d["stored"] = bool(rec.extra.get("stored"))
    if rec.extra.get("laterality_mismatch"):
        d["laterality_mismatch"] = True
    d["error"] = rec.error
    return d


def _patient(args: argparse.Namespace) -> Any:
    """Patient fields from --patient-id (visible in ``ps``), --patient-id-file or $FUNDUS_EDGE_PATIENT_ID (read
    only with --store: without one nothing is stored) and --eye."""
    from ..runtime.field.records import PATIENT_ID_ENV, patient_id_from
    from ..runtime.field.session import Patient

    file = getattr(args, "patient_id_file", None)
    env = None if args.store else {k: v for k, v in os.environ.items() if k != PATIENT_ID_ENV}
    patient = Patient.of(patient_id_from(args.patient_id, file, env), None)
    return Patient(patient.patient_id, Patient.of(None, args.eye).eye)


def screen_field(args: argparse.Namespace) -> int:
    """``screen`` with a store, watch mode, patient fields or a trust policy."""
    from ..runtime import expand_inputs
    from ..runtime.field.audit import AuditLog
    from ..runtime.field.integrity import Integrity
    from ..runtime.field.session import open_session
    from ..runtime.field.store import ResultStore
    from ..runtime.field.watch import WatchOptions

    policy = _policy(args)
    patient = _patient(args)
    if (patient.patient_id or patient.eye) and not args.store:
        raise UsageError("--patient-id, --patient-id-file and --eye are stored with the results: give --store DB")
    if args.watch is not None:
        if args.inputs:
            raise UsageError("give image files or directories, or --watch DIR, not both")
        if not args.store:
            raise UsageError("--watch needs --store DB: the store is what lets a restart go on without "
                             "re-screening or skipping files")
        options = WatchOptions(directory=args.watch, after=args.after, move_to=args.move_to, poll_s=args.poll,
                               settle_s=args.settle, incomplete_grace_s=max(args.grace, args.settle),
                               exit_when_idle=args.exit_when_idle)
        sources: list[str] = []
    else:
        if not args.inputs:
            raise UsageError("give image files or directories to screen, or --watch DIR")
        if args.after != "keep" or args.move_to or args.exit_when_idle:
            raise UsageError("--after, --move-to and --exit-when-idle apply to --watch only")
        sources = expand_inputs(args.inputs)
    audit_path = _audit_path(args, policy)
    integrity = Integrity.at(state_dir()) if args.store else None  # the device key, outside the store
    audit = AuditLog(audit_path, integrity=integrity) if audit_path else None
    store = None
    stop, reason = threading.Event(), list[str]()
    # Signals are caught from before the bundle loads: a SIGTERM that arrives while loading (or between loading
    # and the watch loop) stops the run cleanly instead of killing it.
    with stop_on_signals(stop, reason):
        pipeline = use_pipeline(getattr(args, "pipeline", "off"), len(sources))  # watch mode: no batch

        def choose(b: Any) -> tuple[str | None, str | None, Any]:
            artifact, fmt, settings = screen_choices(args, lambda: b)
            return artifact, fmt, pipeline_settings(settings, pipeline)

        try:
            store = ResultStore(args.store, integrity=integrity) if args.store else None
            session = open_session(args.bundle, policy=policy, store=store, audit=audit, precision=args.precision,
                                   choose=choose, mode="watch" if args.watch is not None else "batch",
                                   decode_limits=decode_limits_for(args), out_dir=_out_dir(args))
            if policy.active and not session.status.signed:
                warn(f"bundle {args.bundle} is not signed; it was accepted because signatures are not required "
                     "(--require-signature)")
            head = (f"bundle {session.bundle_id}, artifact {session.screener.artifact.id} "
                    f"({session.screener.backend.name})" + (f", signed by {session.status.key_id}"
                                                            if session.status.verified else ""))
            if args.watch is not None:
                return _run_watch(args, session, options, patient, stop, reason, head)
            results = _stream(args, session.screen_files(sources, patient, pipeline=pipeline, stop=stop), head)
            session.close(reason[0] if reason else "done")
        finally:
            if store is not None:
                store.close()
            if audit is not None:
                audit.close()
    return _batch_output(args, session, results, len(sources), reason)


def _out_dir(args: argparse.Namespace) -> Path:
    """Where a segmentation bundle's masks and overlays go (--out-dir, default ./fundus-edge-vessels)."""
    return Path(getattr(args, "out_dir", None) or "fundus-edge-vessels")


def _stream(args: argparse.Namespace, results: Iterator[Any], head: str) -> list[Any]:
    """Show each result as it is made (text: a line; --jsonl: ``{"result": ...}`` per line), so an interrupted
    or crashed batch has shown what it did; --json prints one document at the end instead."""
    jsonl = getattr(args, "jsonl", False)
    if not args.json and not jsonl:
        print(head, flush=True)
    done = []
    for rec in results:
        done.append(rec)
        if jsonl:
            print(json.dumps({"result": _result_dict(rec, args.show_patient)}), flush=True)
        elif not args.json:
            print(_line(rec), flush=True)
    return done


def _batch_output(args: argparse.Namespace, session: Any, results: list[Any], n_sources: int,
                  reason: list[str]) -> int:
    """The summary of a batch (its results were shown as they were made; --json: one document with all);
    exit 130 when interrupted, 10 on image errors."""
    interrupted = len(results) < n_sources
    n_err = sum(1 for r in results if r.error_code is not None)
    summary = {"n": len(results), "refer": sum(r.decision == "refer" for r in results),
               "no_refer": sum(r.decision == "no-refer" for r in results),
               "ungradable": sum(r.decision == "ungradable" for r in results), "errors": n_err,
               "stored": sum(1 for r in results if r.extra.get("stored")), "interrupted": interrupted}
    if any(r.decision == "segmented" for r in results):
        summary["segmented"] = sum(r.decision == "segmented" for r in results)
    lines = [f"{summary['n']} images: {summary['refer']} refer, {summary['no_refer']} no-refer, "
             f"{summary['ungradable']} ungradable (retake), {n_err} could not be screened"
             + (f", {summary['stored']} from the store" if args.store else "")
             + (f", {summary['segmented']} segmented" if "segmented" in summary else "")]
    if interrupted:
        lines.append(f"interrupted ({reason[0] if reason else 'stop'}): {n_sources - len(results)} images not "
                     "screened; run the same command again to go on")
    if getattr(args, "jsonl", False):
        print(json.dumps({"summary": summary}), flush=True)
    elif args.json:
        payload = {"bundle_id": session.bundle_id, "artifact": session.screener.artifact.id,
                   "backend": session.screener.backend.name, "signature": session.status.to_dict(),
                   "store": str(args.store) if args.store else None,
                   "results": [_result_dict(r, args.show_patient) for r in results], "summary": summary}
        emit(args, payload, "")
    else:
        print("\n".join(lines))
    if interrupted:
        return 130
    return ImageError.exit_code if n_err else 0


def _run_watch(args: argparse.Namespace, session: Any, options: Any, patient: Any, stop: threading.Event,
               reason: list[str], head: str) -> int:
    from ..runtime.field.watch import Watcher

    def on_result(rec: Any) -> None:
        if args.json or getattr(args, "jsonl", False):
            print(json.dumps({"result": _result_dict(rec, args.show_patient)}), flush=True)
        else:
            print(_line(rec), flush=True)

    print(f"{head}; watching {options.directory} (after: {options.after}); stop with Ctrl-C or SIGTERM",
          file=sys.stderr, flush=True)
    def on_skip(path: str, reason: str) -> None:  # every file not taken, and why (the name shown safely)
        print(f"fundus-edge: watch: not taking {printable(path)}: {reason}", file=sys.stderr, flush=True)

    watcher = Watcher(session, options, patient, stop=stop, on_result=on_result, on_skip=on_skip)
    with stop_on_signals(stop, reason):
        try:
            summary = watcher.run()
        finally:
            session.close(reason[0] if reason else watcher.summary.stopped_by)
    if reason:
        summary.stopped_by = reason[0]
    done = summary.to_dict()
    if args.json or getattr(args, "jsonl", False):
        print(json.dumps({"summary": done}), flush=True)
    print(f"watch stopped ({summary.stopped_by}): {summary.screened} screened, {summary.stored} already in the "
          f"store, {summary.errors} could not be screened", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------- register
def register(sub: Any) -> None:
    """``results`` and ``keys`` live in cli/results.py; ``screen``'s field options in cli/screen.py."""
