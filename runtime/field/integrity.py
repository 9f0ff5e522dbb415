"""Keyed integrity of the result store and the audit log, with a device key kept outside both.

The store's triggers stop an honest mistake, not someone with ``sqlite3`` (drop the triggers, edit a row), and a
hash chain without a secret can be rewritten end to end. So, with a device key (32 random bytes, ``device.key`` in
the state directory, created ``0600`` on first use, never in the store's directory):

- every stored row gets ``HMAC(key, previous row's mac | the row's columns)`` in the ``row_macs`` table: an edited,
  inserted, deleted or re-created row breaks the chain from that row on;
- an **anchor** file in the state directory (one per store, one per audit log), rewritten atomically after every
  row and every audit entry, holds the count and last mac of the rows (the seq and line hash of the log's last
  entry), itself under an HMAC. A store that is missing, empty, truncated or replaced while its anchor says it had
  rows is refused at start and fails ``results verify``; an audit log cut short of its anchored entry fails it too.

What this does not stop is documented in docs/field.md (root on the device can read the key).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import StoreError
from .schema import mac_columns

KEY_FILE = "device.key"
ANCHOR_DIR = "anchors"
GENESIS = "0" * 64


def load_device_key(state: Path, create: bool = True) -> bytes:
    """The device key in ``state``; created (``0600``, never overwritten) when absent and ``create``."""
    path = state / KEY_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if not create:
            raise StoreError(f"no device key {path}: the integrity of this device's records cannot be checked "
                             "without it") from None
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first
            return load_device_key(state, create=False)
        data = secrets.token_bytes(32)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StoreError(f"cannot read the device key {path}: {exc.strerror or exc}") from exc
    if len(data) != 32:
        raise StoreError(f"device key {path} is damaged ({len(data)} bytes, not 32); restore it from the device's "
                         "backup")
    return data


def _canonical(doc: Any) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Integrity:
    """The device key and where anchors live. ``Integrity.at(state_dir)`` creates the key on first use."""

    key: bytes
    state: Path

    @classmethod
    def at(cls, state: Path, create: bool = True) -> Integrity:
        return cls(load_device_key(state, create), state)

    def mac(self, *parts: Any) -> str:
        return hmac.new(self.key, _canonical(list(parts)), hashlib.sha256).hexdigest()

    def row_mac(self, prev: str, row: dict[str, Any]) -> str:
        return self.mac("row", prev, row)

    def anchor_path(self, target: Path, kind: str) -> Path:
        tag = hashlib.sha256(str(target.resolve()).encode()).hexdigest()[:20]
        return self.state / ANCHOR_DIR / f"{tag}.{kind}.json"

    def write_anchor(self, target: Path, kind: str, state: dict[str, Any]) -> None:
        """Record ``state`` for ``target`` (atomic, synced), under the key."""
        path = self.anchor_path(target, kind)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = {"target": str(target.resolve()), "kind": kind, **state}
        doc["mac"] = self.mac("anchor", {k: v for k, v in doc.items() if k != "mac"})
        tmp = path.with_name("." + path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            fh.write(_canonical(doc))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def read_anchor(self, target: Path, kind: str) -> dict[str, Any] | None:
        """The anchor of ``target``; None when there is none. Raises :class:`StoreError` when it was altered."""
        path = self.anchor_path(target, kind)
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"integrity anchor {path} is unreadable or damaged ({exc})") from exc
        if not isinstance(doc, dict) or not hmac.compare_digest(
                str(doc.get("mac")), self.mac("anchor", {k: v for k, v in doc.items() if k != "mac"})):
            raise StoreError(f"integrity anchor {path} does not match the device key: it was altered")
        return doc


# --------------------------------------------------------------------------------------------- the store
ROW_MACS_SCHEMA = "CREATE TABLE IF NOT EXISTS row_macs (id INTEGER PRIMARY KEY, mac TEXT NOT NULL)"


def row_dict(conn: Any, row_id: int) -> dict[str, Any]:
    cur = conn.execute("SELECT * FROM screenings WHERE id = ?", (row_id,))
    names = [d[0] for d in cur.description]
    values = cur.fetchone()
    # the added columns that are NULL are left out: a migration (runtime/field/schema.py) changes no row's mac
    return mac_columns(dict(zip(names, values, strict=True))) if values is not None else {}


def mac_new_row(conn: Any, integrity: Integrity, row_id: int) -> str:
    """Inside the inserting transaction: chain the new row's mac to the last one and store it."""
    last = conn.execute("SELECT mac FROM row_macs ORDER BY id DESC LIMIT 1").fetchone()
    mac = integrity.row_mac(last[0] if last else GENESIS, row_dict(conn, row_id))
    conn.execute("INSERT INTO row_macs (id, mac) VALUES (?, ?)", (row_id, mac))
    return mac


def store_state(conn: Any) -> dict[str, Any]:
    count = conn.execute("SELECT COUNT(*) FROM screenings").fetchone()[0]
    last = conn.execute("SELECT id, mac FROM row_macs ORDER BY id DESC LIMIT 1").fetchone()
    return {"rows": int(count), "last_id": int(last[0]) if last else 0, "last_mac": last[1] if last else GENESIS}


def check_store_anchor(conn: Any, integrity: Integrity, path: Path) -> list[str]:
    """Problems between the store and its anchor (cheap: no full chain walk)."""
    anchor = integrity.read_anchor(path, "store")
    if anchor is None:
        return []
    state = store_state(conn)
    problems = []
    if state["rows"] < int(anchor.get("rows", 0)):
        problems.append(f"the store holds {state['rows']} rows, its anchor says it had {anchor['rows']}: rows were "
                        "deleted, or the store was replaced")
    if anchor.get("last_id"):
        got = conn.execute("SELECT mac FROM row_macs WHERE id = ?", (anchor["last_id"],)).fetchone()
        if got is None or not hmac.compare_digest(str(got[0]), str(anchor.get("last_mac"))):
            problems.append(f"row {anchor['last_id']} is not the row the anchor recorded: the store was replaced "
                            "or its rows were re-created")
    return problems


def check_store_chain(conn: Any, integrity: Integrity) -> tuple[list[str], int]:
    """Walk every row: (problems, rows written before keyed integrity was on, which carry no mac)."""
    macs = dict(conn.execute("SELECT id, mac FROM row_macs").fetchall())
    ids = [r[0] for r in conn.execute("SELECT id FROM screenings ORDER BY id")]
    first = min(macs) if macs else None
    problems: list[str] = []
    unkeyed = sum(1 for i in ids if first is None or i < first)
    prev = GENESIS
    for i in ids:
        if first is None or i < first:
            continue
        want = integrity.row_mac(prev, row_dict(conn, i))
        got = macs.pop(i, None)
        if got is None or not hmac.compare_digest(str(got), want):
            problems.append(f"row {i}: its contents do not match its keyed mac (edited, inserted or re-created)")
            if len(problems) >= 20:
                break
        prev = str(got) if got is not None else want
    if macs and len(problems) < 20:
        problems.append(f"rows {sorted(macs)[:10]} have a mac but are gone from the store: rows were deleted")
    return problems, unkeyed


def check_audit_anchor(integrity: Integrity, log: Path, lines: list[bytes]) -> list[str]:
    """Whether the audit log still holds, unchanged, the entry its anchor recorded last."""
    anchor = integrity.read_anchor(log, "audit")
    if anchor is None:
        return []
    seq, want = int(anchor.get("seq", 0)), str(anchor.get("hash"))
    for raw in lines:
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("seq") == seq:
            if hashlib.sha256(raw.rstrip(b"\n")).hexdigest() == want:
                return []
            return [f"audit entry {seq} is not the entry the anchor recorded: the log was rewritten"]
    return [f"the audit log ends before entry {seq}, which its anchor recorded: its tail was cut"]


def keyed_check(store: Path, audit: Path | None, state: Path) -> dict[str, Any]:
    """``results verify``'s keyed part: the rows' mac chain, the store's and the audit log's anchors.
    Returns ``{"key": bool, "problems": [...], "unkeyed_rows": n}``."""
    import sqlite3

    conn = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        has_macs = conn.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'row_macs'").fetchone()[0] and \
            conn.execute("SELECT COUNT(*) FROM row_macs").fetchone()[0]
        try:
            integrity = Integrity.at(state, create=False)
        except StoreError as exc:
            return {"key": False, "unkeyed_rows": None,
                    "problems": [f"{exc}; the store's rows carry macs made with it"] if has_macs else []}
        problems = check_store_anchor(conn, integrity, store) if has_macs or \
            integrity.read_anchor(store, "store") else []
        chain, unkeyed = check_store_chain(conn, integrity) if has_macs else ([], None)
        problems += chain
    finally:
        conn.close()
    if audit is not None:
        lines = audit.read_bytes().split(b"\n") if audit.exists() else []
        problems += check_audit_anchor(integrity, audit, [raw for raw in lines if raw])
    return {"key": True, "problems": problems, "unkeyed_rows": unkeyed}
