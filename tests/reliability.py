"""Field reliability checks, shared by the tests (small and fast) and ``benchmarks/field_reliability.py``
(the issue's full sizes): fuzzing the decoder and screener, SIGKILL during a watch-mode batch, and a tamper
sweep over a signed bundle. Each returns a plain dict of what it measured.

Test tooling, not runtime: the fuzz driver needs ``hypothesis`` (in the ``dev`` extra).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fundus_edge.errors import IMAGE_ERROR_CODES, BundleError, FundusEdgeError, ImageError

Log = Callable[[str], None]


def rss_bytes() -> int:
    """Resident set size now (Linux /proc), else the peak from getrusage."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # pragma: no cover - not Linux
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def sql_scalar(db: Path, query: str) -> str:
    """One value from a fresh connection (another process may be writing); "" when unavailable."""
    if not db.exists():
        return ""
    c = sqlite3.connect(db, timeout=30)
    try:
        row = c.execute(query).fetchone()
    except sqlite3.OperationalError:
        return ""
    finally:
        c.close()
    return str(row[0]) if row and row[0] is not None else ""


# ------------------------------------------------------------------------------------------------ fuzz
def _trimmed_rss() -> int:
    """RSS after asking glibc to hand freed heap back to the kernel, so the number is live memory, not what
    the allocator kept after the last large decode (that swings by tens of MiB from case to case)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the plain RSS
        pass
    return rss_bytes()


def _fuzz_worker(conn: Any, bundle: str | None) -> None:
    """Runs in a child process: screen (or only preprocess) each input it is sent; reply with the outcome and,
    when asked, this process's RSS. A native crash ends the process, which the parent sees and counts."""
    from fundus_edge.runtime import load
    from fundus_edge.runtime.preprocess import PreprocessSpec, preprocess

    screener = load(bundle) if bundle else None
    spec = PreprocessSpec()
    while True:
        req = conn.recv()
        if req is None:
            break
        msg, measure = req
        try:
            if screener is not None:
                r = screener.screen(msg)
                outcome = r.error["code"] if r.error else ("ungradable" if r.decision == "ungradable" else "ok")
            else:
                preprocess(msg, spec)
                outcome = "ok"
        except ImageError as exc:
            outcome = exc.code if screener is None else f"raised:ImageError:{exc.code}"
        except Exception as exc:  # what the fuzzer looks for
            outcome = f"raised:{type(exc).__name__}: {exc}"[:300]
        conn.send((outcome, _trimmed_rss() if measure else None))
    if screener is not None:
        screener.close()


class _Worker:
    def __init__(self, bundle: str | None) -> None:
        import multiprocessing

        self.bundle = bundle
        self.ctx = multiprocessing.get_context("spawn")
        self.starts = 0
        self._start()

    def _start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_fuzz_worker, args=(child, self.bundle), daemon=True)
        self.proc.start()
        child.close()
        self.starts += 1

    def run(self, data: bytes, timeout: float, measure: bool = False) -> tuple[str, int | None]:
        """(outcome, worker RSS when ``measure``); outcome "crashed:<exit code>" or "hung" when the worker
        died or stalled."""
        try:
            self.conn.send((data, measure))
            if self.conn.poll(timeout):
                outcome, rss = self.conn.recv()
                return str(outcome), rss
            outcome = "hung"
        except (EOFError, OSError):
            outcome = "crashed"
        self.proc.kill()
        self.proc.join()
        outcome = f"{outcome}:{self.proc.exitcode}" if outcome == "crashed" else outcome
        self._start()
        return outcome, None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.send(None)
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def run_fuzz(n: int, seeds: Sequence[tuple[str, bytes]], bundle: str | os.PathLike[str] | None = None,
             seed: int = 0, failures_dir: Path | None = None, case_timeout: float = 120.0,
             log: Log = lambda s: None) -> dict[str, Any]:
    """Send ``n`` hypothesis-generated mutations of ``seeds`` to a worker process that screens them with
    ``bundle`` (preprocess, inference, decision; preprocessing only without a bundle).

    "Uncaught" is anything escaping ``Screener.screen`` (or anything but ImageError escaping preprocess), a
    native crash of the worker, or a case running past ``case_timeout``; such inputs are written to
    ``failures_dir``. The worker is a separate process so that a crash is counted rather than ending the run,
    and so that its memory is the screener's alone: hypothesis keeps every example's choices and grows by
    ~10 MiB per 1,000 examples in its own process. Every 100 cases the worker returns freed heap to the kernel
    (glibc ``malloc_trim``) and reports its RSS; growth is the median of the samples over the last 1,000 cases
    minus the median over cases 1,000-2,000 (after warm-up)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    from fundus_edge.datasets.badinputs import N_OPS, mutate

    codes: Counter[str] = Counter()
    uncaught: list[dict[str, str]] = []
    rss: list[tuple[int, int]] = []
    per_seed: Counter[str] = Counter()
    t0 = time.perf_counter()
    worker = _Worker(str(bundle) if bundle is not None else None)
    ops = st.lists(st.tuples(st.integers(0, N_OPS - 1), st.integers(0, 2**31 - 1), st.integers(0, 2**16)),
                   min_size=1, max_size=8)

    @hseed(seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.integers(0, len(seeds) - 1), ops)
    def case(which: int, mutation: list[tuple[int, int, int]]) -> None:
        name, data = seeds[which]
        data = mutate(data, mutation)
        per_seed[name.split(":")[0]] += 1
        done = sum(codes.values()) + len(uncaught) + 1
        outcome, mem = worker.run(data, case_timeout, measure=done % 100 == 0 or done == n)
        if outcome.startswith(("raised:", "crashed", "hung")):
            digest = hashlib.sha256(data).hexdigest()[:16]
            uncaught.append({"seed": name, "outcome": outcome, "input": digest})
            if failures_dir is not None:
                failures_dir.mkdir(parents=True, exist_ok=True)
                (failures_dir / f"{digest}.bin").write_bytes(data)
        else:
            codes[outcome] += 1
        if mem is not None:
            rss.append((done, mem))
        if done % 2000 == 0:
            log(f"  fuzz: {done}/{n} cases, {len(uncaught)} uncaught, worker RSS {rss[-1][1] / 2**20:.1f} MiB")

    try:
        case()
    finally:
        worker.close()
    total = sum(codes.values()) + len(uncaught)
    # Medians of ten samples each: cases 1,000-2,000 against the last 1,000 cases.
    first = [r for c, r in rss if 1000 <= c <= 2000] or [r for _, r in rss[:10]]
    last = [r for c, r in rss if c > total - 1000] or [r for _, r in rss[-10:]]
    base, end = (float(statistics.median(x)) if x else 0.0 for x in (first, last))
    unknown = sorted(set(codes) - set(IMAGE_ERROR_CODES) - {"ok", "ungradable"})
    return {"cases": total, "uncaught": len(uncaught), "uncaught_examples": uncaught[:10], "outcomes": dict(codes),
            "unknown_codes": unknown, "seeds": dict(per_seed), "through": "screener" if bundle else "preprocess",
            "worker_starts": worker.starts, "rss_mib_median_cases_1000_2000": round(base / 2**20, 2),
            "rss_mib_median_last_1000": round(end / 2**20, 2), "rss_growth_mib": round((end - base) / 2**20, 2),
            "rss_mib_min": round(min((r for _, r in rss), default=0) / 2**20, 2),
            "rss_mib_max": round(max((r for _, r in rss), default=0) / 2**20, 2),
            "rss_samples": len(rss), "seconds": round(time.perf_counter() - t0, 1)}


# ------------------------------------------------------------------------------------------------ kill
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fundus_edge", *args]


def run_kill_test(bundle: Path, work: Path, n_images: int, kills: int, seed: int, log: Log = lambda s: None,
                  image_size: int = 192) -> dict[str, Any]:
    """SIGKILL a watch-mode batch (``--after move``) ``kills`` times at random moments, restart it until the
    inbox is empty, then count what was lost or duplicated, in the store and among the moved files."""
    from fundus_edge.datasets.synthetic import generate
    from fundus_edge.runtime.field.audit import verify_audit_log

    rng = random.Random(seed)
    inbox, done = work / "inbox", work / "done"
    inbox.mkdir(parents=True)
    bases = [generate(100 + i, size=image_size).image for i in range(10)]
    expected: dict[str, str] = {}
    for i in range(n_images):
        p = inbox / f"img-{i:04d}.jpg"
        bases[i % len(bases)].save(p, format="JPEG", quality=85, comment=f"frame {i}".encode())  # unique bytes
        expected[hashlib.sha256(p.read_bytes()).hexdigest()] = p.name
    bad = inbox / "img-corrupt.jpg"  # a bad file rides along: recorded once, moved to failed/
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg \xff\xd9")
    expected[hashlib.sha256(bad.read_bytes()).hexdigest()] = bad.name
    db = work / "r.db"
    cmd = _cli("screen", "--bundle", str(bundle), "--watch", str(inbox), "--store", str(db), "--after", "move",
               "--move-to", str(done), "--poll", "0.05", "--settle", "0", "--exit-when-idle", "--threads", "1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    progress: list[int] = []
    kill_phases: Counter[str] = Counter()
    runs = 0
    t0 = time.perf_counter()
    while True:
        runs += 1
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        if len(progress) < kills:
            # Kill once a random number of further images is stored (some kills during start-up instead), then
            # after a random fraction of one image's time, so kills land at every step: hashing, decode,
            # inference, commit, move.
            before = int(sql_scalar(db, "SELECT COUNT(*) FROM screenings") or 0)
            left = kills - len(progress)
            step = max(1, (len(expected) - before) // (left + 1))
            startup = rng.random() < 0.15
            target = before if startup else before + rng.randint(1, step)
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline:
                if startup:  # imports, store recovery, bundle verification
                    time.sleep(rng.uniform(0.02, 0.3))
                    break
                if int(sql_scalar(db, "SELECT COUNT(*) FROM screenings") or 0) >= target:
                    time.sleep(rng.uniform(0.0, 0.03))
                    break
                time.sleep(0.005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                rows = int(sql_scalar(db, "SELECT COUNT(*) FROM screenings") or 0)
                progress.append(rows)
                kill_phases["start-up" if startup else "batch"] += 1
                log(f"  kill {len(progress)}/{kills}: {rows} of {len(expected)} images stored")
                continue
        code = proc.wait(timeout=3600)
        if code not in (0, 10):  # 10: the corrupt file is an error result, which is expected
            raise FundusEdgeError(f"kill test: run {runs} exited {code}")
        if not any(inbox.glob("*.jpg")):
            break
    c = sqlite3.connect(db)
    stored = [r[0] for r in c.execute("SELECT image_sha256 FROM screenings").fetchall()]
    integrity = [r[0] for r in c.execute("PRAGMA integrity_check").fetchall()]
    c.close()
    moved_hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for p in done.rglob("*.jpg")]
    audit = verify_audit_log(work / "r.audit.jsonl")
    return {
        "images": len(expected), "kills": len(progress), "kill_phases": dict(kill_phases), "runs": runs,
        "rows_at_kills": progress, "stored_rows": len(stored),
        "lost": len(set(expected) - set(stored)) + len(set(expected) - set(moved_hashes)),
        "duplicated": (len(stored) - len(set(stored))) + (len(moved_hashes) - len(set(moved_hashes))),
        "unexpected": len(set(stored) - set(expected)),
        "left_in_inbox": len(list(inbox.glob("*.jpg"))),
        "failed_moved": len(list((done / "failed").glob("*"))) if (done / "failed").exists() else 0,
        "integrity_check": integrity, "audit_chain_ok": bool(audit), "audit_damaged_lines": audit.damaged_lines,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# ------------------------------------------------------------------------------------------------ tamper
def run_tamper_sweep(bundle: Path, work: Path, positions_per_file: int = 200, seed: int = 0,
                     manifest_positions: int | None = None, log: Log = lambda s: None) -> dict[str, Any]:
    """Sign a copy of ``bundle`` with a fresh "clinic" key and try to load it under ``require_signature``
    after: flipping every byte of manifest.json and manifest.sig (two masks each; ``manifest_positions``
    random bytes of each instead, for a quick run), flipping
    ``positions_per_file`` bytes of every other file (first and last included), truncating, extending or
    deleting each file, and the key-swap attacks (unsigned, signed by another key, re-signed after changing a
    model, a signature taken from another bundle). Every attempt goes through the audited check the CLI uses;
    the count of ``bundle-refused`` audit entries must equal the count of refusals."""
    from fundus_edge.bundle.read import MANIFEST, file_entry
    from fundus_edge.bundle.signing import SIGNATURE_FILE, TrustPolicy, generate_keypair, load_signing_key, sign_bundle
    from fundus_edge.runtime.field.audit import AuditLog, verify_audit_log
    from fundus_edge.runtime.field.session import check_bundle

    rng = random.Random(seed)
    work.mkdir(parents=True, exist_ok=True)
    clinic = generate_keypair(work / "keys", "clinic")
    attacker = generate_keypair(work / "keys", "attacker")
    trusted = work / "trusted"
    trusted.mkdir()
    shutil.copy(clinic.public, trusted)
    policy = TrustPolicy(trusted_keys=trusted, require_signature=True)
    b = work / "bundle"
    shutil.copytree(bundle, b)
    sign_bundle(b, load_signing_key(clinic.private))
    audit_path = work / "audit.jsonl"
    audit = AuditLog(audit_path)
    tally: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    accepted: list[str] = []

    def attempt(label: str) -> None:
        tally[label.split(":")[0]] += 1
        try:
            check_bundle(b, policy, audit)
        except BundleError as exc:
            reasons[getattr(exc, "reason", exc.code)] += 1
            return
        accepted.append(label)

    check_bundle(b, policy, audit)  # the intact bundle loads
    t0 = time.perf_counter()
    for name in (MANIFEST, SIGNATURE_FILE):
        p = b / name
        data = p.read_bytes()
        positions = range(len(data)) if manifest_positions is None else sorted(
            {0, len(data) - 1, *(rng.randrange(len(data)) for _ in range(manifest_positions))})
        fd = os.open(p, os.O_WRONLY)
        try:
            for i in positions:
                for mask in (0x01, 0xFF):
                    os.pwrite(fd, bytes([data[i] ^ mask]), i)
                    attempt(f"flip-{name}:{i}")
                os.pwrite(fd, data[i:i + 1], i)
        finally:
            os.close(fd)
        log(f"  tamper: {len(positions)} of the {len(data)} bytes of {name} flipped (2 masks each)")
    files = list(json.loads((b / MANIFEST).read_text())["files"])
    for rel in files:
        p = b / rel
        data = p.read_bytes()
        n = len(data)
        picks = {0, n - 1, *(rng.randrange(n) for _ in range(max(0, positions_per_file - 2)))}
        fd = os.open(p, os.O_WRONLY)
        try:
            for i in sorted(picks):
                os.pwrite(fd, bytes([data[i] ^ (1 << rng.randrange(8))]), i)
                attempt(f"flip-file:{rel}:{i}")
                os.pwrite(fd, data[i:i + 1], i)
        finally:
            os.close(fd)
        for damaged, label in ((data[:-1], "truncate"), (data + b"\x00", "extend"), (None, "delete")):
            if damaged is None:
                p.unlink()
            else:
                p.write_bytes(damaged)
            attempt(f"{label}:{rel}")
            p.write_bytes(data)
        log(f"  tamper: {rel}: {len(picks)} byte flips, truncation, extension, deletion tried")
    # key and signature swaps
    intact = {f: (b / f).read_bytes() for f in [*files, MANIFEST, SIGNATURE_FILE]}

    def restore() -> None:
        for f, content in intact.items():
            (b / f).write_bytes(content)

    (b / SIGNATURE_FILE).unlink()
    attempt("swap:unsigned")
    restore()
    sign_bundle(b, load_signing_key(attacker.private))
    attempt("swap:signed-by-another-key")
    restore()
    model = next(f for f in files if f.endswith(".onnx"))
    for signer in (attacker, None):
        changed = bytearray(intact[model])
        changed[len(changed) // 3] ^= 0x55
        (b / model).write_bytes(bytes(changed))
        m = json.loads(intact[MANIFEST])
        m["files"][model] = file_entry(b / model)
        (b / MANIFEST).write_text(json.dumps(m, indent=2) + "\n")
        if signer is not None:
            sign_bundle(b, load_signing_key(signer.private))
        attempt(f"swap:model-changed-{'resigned-by-another-key' if signer else 'old-signature'}")
        restore()
    other = work / "other-bundle"
    shutil.copytree(b, other)
    m = json.loads(intact[MANIFEST])
    m["name"] = "another-release"
    (other / MANIFEST).write_text(json.dumps(m, indent=2) + "\n")
    sign_bundle(other, load_signing_key(clinic.private))
    shutil.copy(other / SIGNATURE_FILE, b / SIGNATURE_FILE)
    attempt("swap:signature-from-another-bundle-by-the-trusted-key")
    restore()
    check_bundle(b, policy, audit)  # and the restored bundle loads again
    audit.close()
    refused_entries = sum(1 for line in audit_path.read_text().splitlines()
                          if json.loads(line)["event"] == "bundle-refused")
    attempts = sum(tally.values())
    return {"attempts": attempts, "refused": attempts - len(accepted), "accepted": len(accepted),
            "manifest_bytes_covered": "all" if manifest_positions is None else manifest_positions,
            "accepted_examples": accepted[:10], "by_kind": dict(tally), "reasons": dict(reasons),
            "audited_refusals": refused_entries, "audit_chain_ok": bool(verify_audit_log(audit_path)),
            "seconds": round(time.perf_counter() - t0, 1)}
