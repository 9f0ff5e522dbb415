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

from ..errors import ImageError, StoreError, UsageError
from .choices import decode_limits_for, pipeline_settings, screen_choices, use_pipeline
from .output import emit, screening_line, warn

FIELD_SCREEN_OPTIONS = ("store", "watch", "trusted_keys", "require_signature", "device_config", "patient_id", "eye",
                        "audit_log")


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
        if rec.extra.get("patient_mismatch"):
            text += " WARNING: it was stored with different patient fields"
    return text


def _result_dict(rec: Any, show_patient: bool) -> dict[str, Any]:
    d = rec.to_dict(include_patient=show_patient)
    d["stored"] = bool(rec.extra.get("stored"))
    if rec.extra.get("patient_mismatch"):
        d["patient_mismatch"] = True
    d["error"] = rec.error
    return d


def screen_field(args: argparse.Namespace) -> int:
    """``screen`` with a store, watch mode, patient fields or a trust policy."""
    from ..runtime import expand_inputs
    from ..runtime.field.audit import AuditLog
    from ..runtime.field.integrity import Integrity
    from ..runtime.field.session import Patient, open_session
    from ..runtime.field.store import ResultStore
    from ..runtime.field.watch import WatchOptions

    policy = _policy(args)
    patient = Patient.of(args.patient_id, args.eye)
    if (patient.patient_id or patient.eye) and not args.store:
        raise UsageError("--patient-id and --eye are stored with the results: give --store DB")
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
                                   decode_limits=decode_limits_for(args))
            if policy.active and not session.status.signed:
                warn(f"bundle {args.bundle} is not signed; it was accepted because signatures are not required "
                     "(--require-signature)")
            head = (f"bundle {session.bundle_id}, artifact {session.screener.artifact.id} "
                    f"({session.screener.backend.name})" + (f", signed by {session.status.key_id}"
                                                            if session.status.verified else ""))
            if args.watch is not None:
                return _run_watch(args, session, options, patient, stop, reason, head)
            results = list(session.screen_files(sources, patient, pipeline=pipeline, stop=stop))
            session.close(reason[0] if reason else "done")
        finally:
            if store is not None:
                store.close()
            if audit is not None:
                audit.close()
    return _batch_output(args, session, head, results, len(sources), reason)


def _batch_output(args: argparse.Namespace, session: Any, head: str, results: list[Any], n_sources: int,
                  reason: list[str]) -> int:
    """Print (or --json) the results of a batch with a store; exit 130 when interrupted, 10 on image errors."""
    interrupted = len(results) < n_sources
    n_err = sum(1 for r in results if r.error_code is not None)
    summary = {"n": len(results), "refer": sum(r.decision == "refer" for r in results),
               "no_refer": sum(r.decision == "no-refer" for r in results),
               "ungradable": sum(r.decision == "ungradable" for r in results), "errors": n_err,
               "stored": sum(1 for r in results if r.extra.get("stored")), "interrupted": interrupted}
    payload = {"bundle_id": session.bundle_id, "artifact": session.screener.artifact.id,
               "backend": session.screener.backend.name, "signature": session.status.to_dict(),
               "store": str(args.store) if args.store else None,
               "results": [_result_dict(r, args.show_patient) for r in results], "summary": summary}
    lines = [head, *map(_line, results)]
    lines.append(f"{summary['n']} images: {summary['refer']} refer, {summary['no_refer']} no-refer, "
                 f"{summary['ungradable']} ungradable (retake), {n_err} could not be screened"
                 + (f", {summary['stored']} from the store" if args.store else ""))
    if interrupted:
        lines.append(f"interrupted ({reason[0] if reason else 'stop'}): {n_sources - len(results)} images not "
                     "screened; run the same command again to go on")
    emit(args, payload, "\n".join(lines))
    if interrupted:
        return 130
    return ImageError.exit_code if n_err else 0


def _run_watch(args: argparse.Namespace, session: Any, options: Any, patient: Any, stop: threading.Event,
               reason: list[str], head: str) -> int:
    from ..runtime.field.watch import Watcher

    def on_result(rec: Any) -> None:
        if args.json:
            print(json.dumps({"result": _result_dict(rec, args.show_patient)}), flush=True)
        else:
            print(_line(rec), flush=True)

    print(f"{head}; watching {options.directory} (after: {options.after}); stop with Ctrl-C or SIGTERM",
          file=sys.stderr, flush=True)
    watcher = Watcher(session, options, patient, stop=stop, on_result=on_result)
    with stop_on_signals(stop, reason):
        try:
            summary = watcher.run()
        finally:
            session.close(reason[0] if reason else watcher.summary.stopped_by)
    if reason:
        summary.stopped_by = reason[0]
    done = summary.to_dict()
    if args.json:
        print(json.dumps({"summary": done}), flush=True)
    print(f"watch stopped ({summary.stopped_by}): {summary.screened} screened, {summary.stored} already in the "
          f"store, {summary.errors} could not be screened", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------------------------- results
def cmd_results_export(args: argparse.Namespace) -> int:
    from ..runtime.field.audit import AuditLog
    from ..runtime.field.store import ResultStore, export_rows

    store_path = Path(args.store)
    with ResultStore(store_path, create=False) as store:
        rows = store.rows(since=args.since, until=args.until, after_id=args.after_id)
        last_id = [0]

        def tracked() -> Iterator[Any]:
            for r in rows:
                last_id[0] = r.id
                yield r

        if args.out:
            out = Path(args.out)
            tmp = out.with_name("." + out.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", newline="") as fh:
                n = export_rows(tracked(), fh, args.format, include_patient=not args.no_patient)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, out)
        else:
            n = export_rows(tracked(), sys.stdout, args.format, include_patient=not args.no_patient)
    from ..runtime.field.integrity import Integrity

    with AuditLog(args.audit_log or default_audit_path(store_path), integrity=Integrity.at(state_dir())) as audit:
        audit.record("results-exported", store=str(store_path), rows=n, format=args.format, since=args.since,
                     until=args.until, after_id=args.after_id, last_id=last_id[0] or None,
                     to=str(args.out) if args.out else "stdout", patient_fields=not args.no_patient)
    print(f"exported {n} screenings" + (f" to {args.out}" if args.out else "") +
          (f"; the last id is {last_id[0]} (resume with --after-id {last_id[0]})" if n else ""), file=sys.stderr)
    return 0


def cmd_results_verify(args: argparse.Namespace) -> int:
    from ..runtime.field.audit import verify_audit_log
    from ..runtime.field.integrity import keyed_check
    from ..runtime.field.store import ResultStore

    store_path = Path(args.store)
    with ResultStore(store_path, create=False) as store:
        integrity = store.integrity_check()
        n = store.count()
    audit_path = Path(args.audit_log) if args.audit_log else default_audit_path(store_path)
    audit = verify_audit_log(audit_path) if audit_path.exists() else None
    keyed = keyed_check(store_path, audit_path, state_dir())
    ok = integrity == ["ok"] and (audit is None or bool(audit)) and not keyed["problems"]
    payload = {"store": str(store_path), "rows": n, "integrity_check": integrity,
               "audit": audit.to_dict() if audit is not None else None, "keyed": keyed, "ok": ok}
    lines = [f"{store_path}: {n} screenings, integrity_check: {'; '.join(integrity)}",
             "keyed integrity (device key): " + ("; ".join(keyed["problems"]) or "intact")]
    if audit is None:
        lines.append(f"audit log {audit_path}: not found")
    else:
        lines.append(f"audit log {audit_path}: {audit.entries} entries, chain "
                     f"{'intact' if audit else 'BROKEN: ' + '; '.join(audit.problems)}"
                     + (f", damaged lines {audit.damaged_lines}" if audit.damaged_lines else ""))
    emit(args, payload, "\n".join(lines))
    if not ok:
        raise StoreError(f"{store_path} failed verification; keep a copy of the files and restore the store "
                         "from its last export")
    return 0


# ----------------------------------------------------------------------------------------------- keys
def cmd_keys_generate(args: argparse.Namespace) -> int:
    from ..bundle.signing import generate_keypair

    keys = generate_keypair(args.out, args.name, passphrase_from_env(args.passphrase_env))
    emit(args, keys.to_dict(),
          f"key id {keys.key_id}\n"
          f"private key: {keys.private} (mode 600{', encrypted' if args.passphrase_env else ''}): keep it off the "
          "device, sign bundles with 'fundus-edge build --sign-key'\n"
          f"public key:  {keys.public}: copy it into each device's trusted-keys directory")
    return 0


def cmd_keys_verify(args: argparse.Namespace) -> int:
    from ..bundle.signing import TrustPolicy, verify_bundle

    bundle, status = verify_bundle(args.bundle, TrustPolicy(trusted_keys=args.trusted_keys, require_signature=True))
    emit(args, {"bundle": str(args.bundle), "bundle_id": bundle.bundle_id, **status.to_dict(),
                 "files_verified": len(bundle.spec.files)},
          f"bundle {bundle.bundle_id}: signature by key {status.key_id} verified; all "
          f"{len(bundle.spec.files)} files match the signed manifest")
    return 0


# ----------------------------------------------------------------------------------------------- register
def register(sub: Any) -> None:
    r = sub.add_parser("results", help="export or verify the result store")
    rs = r.add_subparsers(dest="results_command", required=True)
    e = rs.add_parser("export", help="export screenings as CSV or JSON lines (for sync)")
    e.add_argument("--store", required=True, type=Path)
    e.add_argument("--since", help="ISO date or date-time (UTC unless it has an offset)")
    e.add_argument("--until", help="ISO date or date-time, exclusive")
    e.add_argument("--after-id", type=int, help="only rows with an id above this (incremental sync)")
    e.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    e.add_argument("--out", type=Path, help="file to write (mode 600; default stdout)")
    e.add_argument("--no-patient", action="store_true", help="leave out patient_id and eye")
    e.add_argument("--audit-log", type=Path)
    e.set_defaults(func=cmd_results_export)
    v = rs.add_parser("verify", help="PRAGMA integrity_check of the store and the audit log's hash chain")
    v.add_argument("--store", required=True, type=Path)
    v.add_argument("--audit-log", type=Path)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_results_verify)

    k = sub.add_parser("keys", help="bundle signing keys (needs fundus-edge[secure])")
    ks = k.add_subparsers(dest="keys_command", required=True)
    kg = ks.add_parser("generate", help="create an Ed25519 key pair for signing bundles")
    kg.add_argument("--out", required=True, type=Path, help="directory for NAME.key and NAME.pub")
    kg.add_argument("--name", default="fundus-edge-signing")
    kg.add_argument("--passphrase-env", metavar="VAR", help="encrypt the private key with the passphrase in $VAR")
    kg.add_argument("--json", action="store_true")
    kg.set_defaults(func=cmd_keys_generate)
    kv = ks.add_parser("verify", help="check a bundle's signature and files against trusted keys")
    kv.add_argument("--bundle", required=True, type=Path)
    kv.add_argument("--trusted-keys", required=True, type=Path)
    kv.add_argument("--json", action="store_true")
    kv.set_defaults(func=cmd_keys_verify)

