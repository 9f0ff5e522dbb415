"""``results export|verify`` (the result store) and ``keys generate|verify`` (bundle signing keys).

Registered through ``COMMAND_MODULES`` in cli/main.py. Heavy imports stay inside the command functions.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import StoreError
from .field import default_audit_path, passphrase_from_env, state_dir
from .output import emit


# ----------------------------------------------------------------------------------------------- results
def cmd_results_export(args: argparse.Namespace) -> int:
    from ..runtime.field.audit import AuditLog
    from ..runtime.field.store import ResultStore, export_file, export_rows

    store_path = Path(args.store)
    with ResultStore(store_path, create=False) as store:
        rows = store.rows(since=args.since, until=args.until, after_id=args.after_id)
        last_id = [0]

        def tracked() -> Iterator[Any]:
            for r in rows:
                last_id[0] = r.id
                yield r

        if args.out:  # atomic: a failure midway leaves nothing behind (no partial file with patient IDs)
            n = export_file(tracked(), Path(args.out), args.format, include_patient=not args.no_patient)
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
    with ResultStore(store_path, create=False, migrate=False) as store:  # verify changes nothing
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

