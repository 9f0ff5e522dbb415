"""Field screening: bad inputs never crash a run, results are stored once, export, watch mode, signals and
SIGKILL crash safety. Uses the session's reference bundle (``built``)."""

from __future__ import annotations

import base64
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from reliability import _cli, run_kill_test
from reliability import sql_scalar as _sql

from fundus_edge.cli import main, make_parser
from fundus_edge.datasets.badinputs import OK, UNGRADABLE, corpus, fundus_jpeg, write_corpus
from fundus_edge.errors import IMAGE_ERROR_CODES, StoreError
from fundus_edge.runtime.field.audit import AuditLog
from fundus_edge.runtime.field.session import FieldSession, Patient, open_session
from fundus_edge.runtime.field.store import ResultStore
from fundus_edge.runtime.field.watch import MARK_SUFFIX, Watcher, WatchOptions

REPO = Path(__file__).resolve().parent.parent
SECRET_PATIENT = "MRN-SECRET-4471"


def _audit_events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _wait_for(cond: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_image_error_codes_are_stable() -> None:
    # Codes are part of the store's data and of every --json consumer: they may be added, never renamed.
    assert set(IMAGE_ERROR_CODES) == {"not-found", "empty-file", "not-an-image", "decode-failed", "too-large",
                                      "too-small", "unsupported-mode", "internal-error"}


def test_bad_inputs_batch_continues_and_store_records_each(built: Any, tmp_path: Path, real_photos: list[Path],
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    cases = write_corpus(tmp_path / "in")
    (tmp_path / "in" / real_photos[0].name).write_bytes(real_photos[0].read_bytes())
    db = tmp_path / "r.db"
    code = main(["screen", "--bundle", str(built.out), "--store", str(db), str(tmp_path / "in"), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 10  # some images failed, the others were screened
    def outcome(error_code: str | None, decision: str | None, name: str) -> str:
        if error_code:
            return error_code
        return UNGRADABLE if decision == UNGRADABLE and expected[name] == UNGRADABLE else OK

    expected = {name: c.expect for name, c in cases.items()} | {real_photos[0].name: OK}
    got = {Path(r["source"]).name: r for r in doc["results"]}
    got_outcomes = {n: outcome(r["error"] and r["error"]["code"], r.get("decision"), n) for n, r in got.items()}
    assert got_outcomes == expected
    assert "internal-error" not in got_outcomes.values()  # every bad input got its specific code
    assert all(got[n]["quality"]["reasons"] for n, e in expected.items() if e == UNGRADABLE)  # and says why
    with ResultStore(db) as s:
        rows = {Path(r.source).name: r for r in s.rows()}
        assert {n: outcome(r.error_code, r.decision, n) for n, r in rows.items()} == expected
        assert all(rows[n].quality for n, e in expected.items() if e == UNGRADABLE)  # the quality dict is stored
        assert all(r.image_sha256 and len(r.image_sha256) == 64 for r in rows.values())
        assert rows[real_photos[0].name].decision in ("refer", "no-refer")
        assert s.integrity_check() == ["ok"]
    events = _audit_events(tmp_path / "r.audit.jsonl")
    errors = [e for e in events if e["event"] == "image-error"]
    assert len(errors) == sum(1 for v in expected.values() if v not in (OK, UNGRADABLE))
    assert all("source" not in e and "message" not in e for e in errors)  # code and hash, never the path


def test_unexpected_failure_is_contained_audited_and_retryable(built: Any, tmp_path: Path,
                                                               real_photos: list[Path]) -> None:
    store, audit = ResultStore(tmp_path / "r.db"), AuditLog(tmp_path / "a.jsonl")
    with open_session(built.out, store=store, audit=audit) as session:
        real_infer = session.screener.backend.infer
        calls = [0]

        def flaky(batch: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                raise RuntimeError("simulated backend fault")
            return real_infer(batch)

        session.screener.backend.infer = flaky  # type: ignore[method-assign]
        first = session.screen_file(real_photos[0])
        second = session.screen_file(real_photos[1])
        retry = session.screen_file(real_photos[0])  # an internal error is not final: screened again
    store.close()
    audit.close()
    assert first.error_code == "internal-error" and "simulated backend fault" in (first.error_message or "")
    assert second.ok and retry.ok and retry.id != first.id
    events = _audit_events(tmp_path / "a.jsonl")
    internal = [e for e in events if e["event"] == "internal-error"]
    assert internal and internal[0]["exception"] == "RuntimeError"
    assert events[-1]["event"] == "session-stop" and events[-1]["screened"] == 3


def test_oversized_file_is_refused_without_decoding(built: Any, tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    big.write_bytes(fundus_jpeg() + b"\x00" * 4096)
    with open_session(built.out) as session:
        session.max_file_bytes = 1024
        rec = session.screen_file(big)
        missing = session.screen_file(tmp_path / "nope.jpg")
    assert rec.error_code == "too-large" and rec.image_sha256 and "MiB" in (rec.error_message or "")
    assert missing.error_code == "not-found" and missing.image_sha256 is None


def test_same_image_is_not_screened_twice(built: Any, tmp_path: Path, real_photos: list[Path],
                                          capsys: pytest.CaptureFixture[str]) -> None:
    db, args = tmp_path / "r.db", [str(p) for p in real_photos[:2]]
    assert main(["screen", "--bundle", str(built.out), "--store", str(db), "--patient-id", SECRET_PATIENT,
                 "--eye", "right", *args, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    copy = tmp_path / "renamed.jpg"  # same bytes under another name: same image
    copy.write_bytes(real_photos[0].read_bytes())
    # the same patient and eye again: every result comes from the store, nothing is screened twice
    assert main(["screen", "--bundle", str(built.out), "--store", str(db), "--patient-id", SECRET_PATIENT,
                 "--eye", "R", *args, str(copy)]) == 0
    again = capsys.readouterr().out
    assert again.count("[stored result #") == 3 and "0 could not be screened, 3 from the store" in again
    # the same photos screened for a second patient: that patient's own rows (schema 2: the key has the patient)
    assert main(["screen", "--bundle", str(built.out), "--store", str(db), "--patient-id", "MRN-OTHER",
                 *args, str(copy)]) == 0
    out = capsys.readouterr()
    second = out.out
    assert second.count("[stored result #") == 1 and "0 could not be screened, 1 from the store" in second
    with ResultStore(db) as s:
        rows = list(s.rows())
    assert len(rows) == 4
    assert [(r.patient_id, r.eye) for r in rows] == [(SECRET_PATIENT, "right")] * 2 + [("MRN-OTHER", None)] * 2
    assert [r.image_sha256 for r in rows[:2]] == [r.image_sha256 for r in rows[2:]]
    assert [r["probability"] for r in first["results"]] == [r.probability for r in rows[:2]]
    text = out.out + out.err + (tmp_path / "r.audit.jsonl").read_text() + json.dumps(first) + again
    assert SECRET_PATIENT not in text and "MRN-OTHER" not in text  # patient fields stay out unless asked
    assert main(["screen", "--bundle", str(built.out), "--store", str(db), "--patient-id", SECRET_PATIENT,
                 "--eye", "right", *args, "--json", "--show-patient"]) == 0
    assert SECRET_PATIENT in capsys.readouterr().out


def test_results_export_and_verify(built: Any, tmp_path: Path, real_photos: list[Path],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "r.db"
    assert main(["screen", "--bundle", str(built.out), "--store", str(db), "--patient-id", "P-1", "--eye", "L",
                 *map(str, real_photos[:3])]) == 0
    capsys.readouterr()
    out = tmp_path / "export.csv"
    assert main(["results", "export", "--store", str(db), "--since", "2000-01-01", "--out", str(out)]) == 0
    assert "exported 3 screenings" in capsys.readouterr().err
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("id,created_at,image_sha256") and ",P-1,left," in lines[1]
    assert main(["results", "export", "--store", str(db), "--format", "jsonl", "--after-id", "1",
                 "--no-patient"]) == 0
    docs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [d["id"] for d in docs] == [2, 3] and all("patient_id" not in d for d in docs)
    assert docs[0]["bundle_id"] == built.manifest["bundle_id"] and docs[0]["kit_version"]
    exports = [e for e in _audit_events(tmp_path / "r.audit.jsonl") if e["event"] == "results-exported"]
    assert [(e["rows"], e["patient_fields"]) for e in exports] == [(3, True), (2, False)]
    assert main(["results", "verify", "--store", str(db), "--json"]) == 0
    ok = json.loads(capsys.readouterr().out)
    assert ok["integrity_check"] == ["ok"] and ok["audit"]["ok"] and ok["rows"] == 3
    log = tmp_path / "r.audit.jsonl"
    log.write_text(log.read_text().replace('"rows":3', '"rows":0'))
    assert main(["results", "verify", "--store", str(db)]) == StoreError.exit_code
    assert "BROKEN" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ watch
def _watcher(session: FieldSession, inbox: Path, **kw: Any) -> Watcher:
    opts = WatchOptions(directory=inbox, poll_s=0.05, settle_s=kw.pop("settle_s", 0.0), **kw)
    return Watcher(session, opts, Patient(), keep_results=True)


def test_watch_takes_only_complete_files_and_moves_them(built: Any, tmp_path: Path) -> None:
    inbox, done, db = tmp_path / "inbox", tmp_path / "done", tmp_path / "r.db"
    inbox.mkdir()
    data = fundus_jpeg(seed=21)
    seen_while_partial: list[tuple[bool, str]] = []

    def camera_app(stop: threading.Event) -> None:  # another thread, as another process would be
        try:
            partial = inbox / "a.jpg"
            partial.write_bytes(data[: len(data) // 2])  # still being written
            time.sleep(0.8)
            seen_while_partial.append((partial.exists(), _sql(db, "SELECT COUNT(*) FROM screenings")))
            with open(partial, "ab") as fh:
                fh.write(data[len(data) // 2:])
            (inbox / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50 + b"IEND\xaeB`\x82")
            (inbox / ".hidden.jpg").write_bytes(data)  # temp names are never taken
            (inbox / "notes.txt").write_text("x")
            _wait_for(lambda: (done / "a.jpg").exists() and (done / "failed" / "junk.png").exists(), what="moves")
        finally:
            stop.set()

    store = ResultStore(db)
    with open_session(built.out, store=store) as session:
        w = _watcher(session, inbox, after="move", move_to=done, settle_s=0.2, incomplete_grace_s=30.0)
        t = threading.Thread(target=camera_app, args=(w.stop,))
        t.start()
        summary = w.run()
        t.join(40)
    rows = {Path(r.source).name: r for r in store.rows()}
    store.close()
    assert seen_while_partial == [(True, "0")]  # not taken while it had no JPEG end marker
    assert summary.stopped_by == "stopped" and (summary.screened, summary.errors) == (2, 1)
    assert set(rows) == {"a.jpg", "junk.png"} and rows["a.jpg"].ok and rows["junk.png"].error_code == "not-an-image"
    assert (done / "a.jpg").read_bytes() == data
    assert sorted(p.name for p in inbox.iterdir()) == [".hidden.jpg", "notes.txt"]


def test_watch_restarts_neither_rescreen_nor_skip(built: Any, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i in range(3):
        (inbox / f"{i}.jpg").write_bytes(fundus_jpeg(seed=30 + i, size=256))
    store = ResultStore(tmp_path / "r.db")
    for after in ("keep", "mark"):
        with open_session(built.out, store=store) as s1:
            first = _watcher(s1, inbox, after=after, exit_when_idle=True).run()
        (inbox / f"new-{after}.jpg").write_bytes(fundus_jpeg(seed=40 if after == "keep" else 41, size=256))
        with open_session(built.out, store=store) as s2:  # a restart: a new process would see the same
            second = _watcher(s2, inbox, after=after, exit_when_idle=True).run()
        if after == "keep":
            assert (first.screened, first.stored) == (3, 0)
            assert (second.screened, second.stored) == (1, 3)  # old files: hashed, found, not screened again
        else:
            assert (first.screened, first.stored) == (0, 4)  # the store already had all four
            assert (second.screened, second.stored) == (1, 0)  # marked files are not even read again
    marks = sorted(p.name for p in inbox.glob("*" + MARK_SUFFIX))
    assert marks == sorted(f"{n}.jpg{MARK_SUFFIX}" for n in ("0", "1", "2", "new-keep", "new-mark"))
    mark = json.loads((inbox / f"0.jpg{MARK_SUFFIX}").read_text())
    assert mark["ok"] and mark["row"] >= 1
    # a file rewritten with new content under a marked name is screened again
    (inbox / "0.jpg").write_bytes(fundus_jpeg(seed=50, size=256))
    os.utime(inbox / "0.jpg", ns=(time.time_ns(), time.time_ns() + 10**9))
    with open_session(built.out, store=store) as s3:
        third = _watcher(s3, inbox, after="mark", exit_when_idle=True).run()
    assert (third.screened, third.stored) == (1, 0)
    assert store.count() == 6
    store.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_watch_stops_cleanly_on_signals(built: Any, tmp_path: Path, sig: signal.Signals) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    db, log = tmp_path / "r.db", tmp_path / "r.audit.jsonl"
    proc = subprocess.Popen(_cli("screen", "--bundle", str(built.out), "--watch", str(inbox), "--store", str(db),
                                 "--poll", "0.1", "--settle", "0", "--patient-id", SECRET_PATIENT),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: log.exists() and "bundle-loaded" in log.read_text(), 60, "the watcher to start")
        (inbox / "x.jpg").write_bytes(fundus_jpeg(seed=60))
        _wait_for(lambda: "x.jpg" in _sql(db, "SELECT group_concat(source) FROM screenings"), 30, "x.jpg")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert f"watch stopped ({sig.name})" in err and "x.jpg" in out
    last = _audit_events(log)[-1]
    assert last["event"] == "session-stop" and last["reason"] == sig.name and last["screened"] == 1
    assert SECRET_PATIENT not in out + err + log.read_text()
    assert _sql(db, "PRAGMA integrity_check") == "ok"


def test_example_systemd_unit_runs_a_valid_command() -> None:
    unit = (REPO / "deploy" / "systemd" / "fundus-edge-watch.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines() if "=" in line and not line.startswith("#"))
    argv = shlex.split(settings["ExecStart"])
    assert argv[0].endswith("/fundus-edge")
    args = make_parser().parse_args(argv[1:])
    assert args.command == "screen" and args.watch and args.store and args.device_config and args.after == "move"
    assert settings["KillSignal"] == "SIGTERM" and settings["PrivateNetwork"] == "yes"
    assert settings["RestartPreventExitStatus"].split() == ["2", "3", "4"]
    config = (REPO / "deploy" / "device.toml").read_text()
    assert "require_signature = true" in config


# ------------------------------------------------------------------------------------------------ crash safety
def test_sigkill_during_a_batch_loses_and_duplicates_nothing(built: Any, tmp_path: Path) -> None:
    result = run_kill_test(built.out, tmp_path, n_images=40, kills=3, seed=1)
    assert result["kills"] == 3, result
    assert result["lost"] == 0 and result["duplicated"] == 0 and result["unexpected"] == 0, result
    assert result["stored_rows"] == result["images"] == 41 and result["left_in_inbox"] == 0
    assert result["failed_moved"] == 1
    assert result["integrity_check"] == ["ok"] and result["audit_chain_ok"]


def test_image_bytes_never_reach_logs(built: Any, tmp_path: Path, real_photos: list[Path],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(real_photos[1].read_bytes()[:5000])
    assert main(["screen", "--bundle", str(built.out), "--store", str(tmp_path / "r.db"), str(real_photos[0]),
                 str(bad)]) == 10
    out = capsys.readouterr()
    logs = out.out + out.err + (tmp_path / "r.audit.jsonl").read_text()
    for p in (real_photos[0], bad):
        chunk = p.read_bytes()[200:232]
        for enc in (chunk.hex(), base64.b64encode(chunk).decode(), chunk.decode("latin-1")):
            assert enc not in logs
    assert max(len(line) for line in logs.splitlines()) < 2000


def test_corpus_is_what_the_issue_lists() -> None:
    names = {c.name for c in corpus()}
    for required in ("empty.jpg", "truncated.jpg", "truncated.png", "corrupt-crc.png", "png-named.jpg",
                     "notes.jpg", "bomb-900mp.png", "huge-dims.jpg", "cmyk.jpg", "grey16.png", "palette.png",
                     "alpha.png", "grey.jpg", "exif-rotated.jpg", "tiny.png", "not-fundus.jpg"):
        assert required in names


def test_watch_survives_its_directory_going_away(built: Any, tmp_path: Path) -> None:
    inbox = tmp_path / "usb"
    inbox.mkdir()
    audit = AuditLog(tmp_path / "a.jsonl")
    with open_session(built.out, store=ResultStore(tmp_path / "r.db"), audit=audit) as session:
        w = _watcher(session, inbox)
        inbox.rename(tmp_path / "pulled-out")  # the stick is pulled out mid-run
        assert w.poll_once() == (0, 0) and w.poll_once() == (0, 0)
        (tmp_path / "pulled-out").rename(inbox)
        (inbox / "a.jpg").write_bytes(fundus_jpeg(seed=70, size=256))
        assert w.poll_once() == (1, 0)
        session.store.close()  # type: ignore[union-attr]
    audit.close()
    events = [e["event"] for e in _audit_events(tmp_path / "a.jsonl")]
    assert events.count("watch-directory-unavailable") == 1


def test_patient_fields_need_a_store(built: Any, real_photos: list[Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["screen", "--bundle", str(built.out), "--patient-id", "P-1", str(real_photos[0])]) == 2
    assert "--store" in capsys.readouterr().err
    assert main(["screen", "--bundle", str(built.out), "--watch", str(real_photos[0].parent)]) == 2
    assert main(["screen", "--bundle", str(built.out)]) == 2


def test_cli_registration_stays_cheap() -> None:
    from fundus_edge.runtime.field.watch import AFTER_CHOICES

    code = ("import sys; from fundus_edge.cli import make_parser; p = make_parser();"
            "print([m for m in ('numpy', 'PIL', 'sqlite3', 'cryptography', 'onnxruntime') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
    screen = make_parser()._subparsers._group_actions[0].choices["screen"]  # type: ignore[union-attr]
    after = next(a for a in screen._actions if a.dest == "after")
    assert tuple(after.choices) == AFTER_CHOICES


def test_store_path_takes_the_device_profile_after_verifying(built: Any, tmp_path: Path, real_photos: list[Path],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["screen", "--device", "rpi4", "--bundle", str(built.out), str(real_photos[0]), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["screen", "--device", "rpi4", "--bundle", str(built.out), "--store", str(tmp_path / "r.db"),
                 str(real_photos[0]), "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)
    assert (stored["artifact"], stored["backend"]) == (plain["artifact"], plain["backend"])
    assert stored["results"][0]["probability"] == pytest.approx(plain["results"][0]["probability"], abs=1e-6)
    # a damaged bundle is refused (and audited) before the profile reads its artifact list
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(built.out, damaged)
    with open(damaged / "report.md", "a") as fh:
        fh.write("edited\n")
    assert main(["screen", "--device", "rpi4", "--bundle", str(damaged), "--store", str(tmp_path / "r.db"),
                 str(real_photos[0])]) == 4
    last = _audit_events(tmp_path / "r.audit.jsonl")[-1]
    assert last["event"] == "bundle-refused" and last["code"] == "bundle-integrity" and "report.md" in last["message"]
