"""Performance pieces (issue 6): device projection, reused input buffers, the decode/infer pipeline, ORT options.

No timed assertions: speed is measured by the scripts in benchmarks/, these tests check what the numbers rest on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fundus_edge.bundle.manifest import Manifest
from fundus_edge.bundle.read import Bundle, load_bundle
from fundus_edge.cli import main
from fundus_edge.cli.choices import pipeline_settings, use_pipeline
from fundus_edge.devices.profile import get_profile, profile_from_dict, read_toml
from fundus_edge.devices.projection import LABEL, bound_ms, format_projection, project, project_artifacts
from fundus_edge.errors import DeviceError, UsageError
from fundus_edge.runtime import BackendSettings, load
from fundus_edge.runtime.bench import bundle_macs
from fundus_edge.runtime.screen import overlapped

RESNET18_MACS = 1_814_000_000  # ResNet-18 at 224 x 224 (torchvision, 1000 classes: 1.814 GMAC)


# ------------------------------------------------------------------------------------------------ projection
def test_projection_gives_the_issues_physical_bounds() -> None:
    pi4, pi5 = project(get_profile("rpi4"), RESNET18_MACS, "int8"), project(get_profile("rpi5"), RESNET18_MACS, "int8")
    assert pi4 is not None and pi5 is not None
    assert round(pi4.bound_ms, 1) == 31.5 and pi4.cores == 4 and pi4.clock_ghz == pytest.approx(1.8)
    assert round(pi5.bound_ms, 1) == 5.9 and pi5.clock_ghz == pytest.approx(2.4)
    # the formula itself, and fp32 uses the fp32 peak (half the A72's int8 MACs per cycle)
    assert bound_ms(RESNET18_MACS, 4, 1.8e9, 8) == pytest.approx(pi4.bound_ms)
    fp32 = project(get_profile("rpi4"), RESNET18_MACS, "fp32")
    assert fp32 is not None and fp32.bound_ms == pytest.approx(2 * pi4.bound_ms)
    # the projection is the bound over the profile's efficiency, so never below the bound
    for p in (pi4, pi5, fp32):
        assert p.projected_ms == pytest.approx(p.bound_ms / p.efficiency) and p.projected_ms >= p.bound_ms
    # Pi 4 efficiency is the published ncnn ResNet-18 figure: the projection lands on it (84 ms int8, 123 ms fp32)
    assert pi4.projected_ms == pytest.approx(84.0, rel=0.02) and fp32.projected_ms == pytest.approx(123.1, rel=0.02)


def test_projection_cores_follow_the_profile_threads_and_missing_compute_gives_none() -> None:
    doc = read_toml(Path(get_profile("rpi4").source), DeviceError, "profile")
    doc["runtime"]["threads"] = 2
    two = project(profile_from_dict(doc, "two-threads"), RESNET18_MACS, "int8")
    assert two is not None and two.cores == 2 and round(two.bound_ms, 1) == 63.0
    doc["runtime"]["threads"] = 0  # 0: all cores
    all_cores = project(profile_from_dict(doc, "all"), RESNET18_MACS, "int8")
    assert all_cores is not None and all_cores.cores == 4
    del doc["compute"]
    assert project(profile_from_dict(doc, "no-compute"), RESNET18_MACS, "int8") is None
    doc["compute"] = {"int8_macs_per_cycle": 8, "fp32_macs_per_cycle": 4, "int8_efficiency": 1.5,
                      "fp32_efficiency": 0.5}
    with pytest.raises(DeviceError, match="efficiencies"):
        profile_from_dict(doc, "bad")


def test_projection_table_is_labelled_and_says_na_without_macs() -> None:
    rows = project_artifacts(RESNET18_MACS, [("onnx-int8", "int8"), ("onnx-fp32", "fp32")])
    assert {p.device for p in rows} == {"rpi4", "rpi5", "jetson-orin-nano"} and len(rows) == 6
    text = format_projection(rows, RESNET18_MACS, "test")
    assert LABEL in text and ">= 31.5 / ~" in text and ">= 5.9 / ~" in text
    assert all(r.to_dict()["label"] == LABEL for r in rows)
    assert project_artifacts(None, [("onnx-int8", "int8")]) == []
    assert "n/a" in format_projection([], None, "no MAC count")


def test_manifest_records_macs_that_the_tflite_file_confirms(built: Any) -> None:
    from fundus_edge.runtime.tflite_graph import inspect_tflite

    bundle = load_bundle(built.out)
    compute = bundle.manifest["compute"]
    assert compute["counted_on"] == "model.fp32.onnx" and not compute["uncounted"]
    macs, source = bundle_macs(bundle)
    assert macs == compute["macs"] > 0 and "manifest" in source
    tfl = inspect_tflite(bundle.path(bundle.artifact(fmt="tflite", precision="fp32")))
    assert tfl.integer_macs + tfl.float_macs == macs  # two independent counts of the same network
    # a bundle from before the field: counted on its .tflite file; with no .tflite either: n/a
    old = {k: v for k, v in bundle.manifest.items() if k != "compute"}
    assert bundle_macs(Bundle(bundle.root, Manifest.from_dict(old), "x"))[0] == macs
    keep = {a["id"] for a in old["artifacts"] if a["format"] == "onnx"}
    onnx_only = {**old, "artifacts": [a for a in old["artifacts"] if a["id"] in keep],
                 "files": {k: v for k, v in old["files"].items() if not k.endswith(".tflite")},
                 "gate": {**old["gate"], "summary": {k: v for k, v in old["gate"]["summary"].items() if k in keep}},
                 **{part: {k: v for k, v in old[part].items() if k in keep} for part in ("quantization", "export")}}
    none, why = bundle_macs(Bundle(bundle.root, Manifest.from_dict(onnx_only), "x"))
    assert none is None and "rebuild" in why


def test_bench_json_carries_the_projection(built: Any, real_photos: list[Path],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "--bundle", str(built.out), str(real_photos[0]), "--artifacts", "onnx-int8",
                 "--repeats", "1", "--no-cold-start", "--project", "rpi4", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    proj = doc["projection"]
    assert proj["label"] == LABEL and proj["devices"] == ["rpi4"]
    (row,) = proj["rows"]
    assert row["artifact"] == "onnx-int8" and row["bound_ms"] == pytest.approx(proj["macs"] / (4 * 1.8e9 * 8) * 1e3)
    assert doc["rows"][0]["projection"]["rpi4"]["projected_ms"] == pytest.approx(row["projected_ms"])


# ---------------------------------------------------------------------------------------------- input buffer
def test_reused_input_buffer_gives_identical_tensors_and_results(built: Any, real_photos: list[Path]) -> None:
    with load(built.out, artifact="onnx-int8", reuse_buffers=True) as reused, \
            load(built.out, artifact="onnx-int8", reuse_buffers=False) as fresh:
        buf = reused.input_buffer(0)
        assert buf is not None and fresh.input_buffer(0) is None
        for photo in real_photos[:3]:
            a, b = reused.prepare(str(photo)), fresh.prepare(str(photo))
            assert a.tensor is buf and b.tensor is not None and b.tensor is not buf  # written in place, no copy
            assert np.array_equal(a.tensor, b.tensor)
            ra, rb = reused.finish(a), fresh.finish(b)
            assert ra.probability == rb.probability and ra.decision == rb.decision
        assert reused.input_buffer(1) is not buf  # the pipeline's second stage has its own


# ---------------------------------------------------------------------------------------------- pipeline
def _plain(results: list[Any]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.to_dict().items() if k != "timings_ms"} for r in results]


def test_pipeline_gives_the_same_results_in_order_with_bad_images(built: Any, real_photos: list[Path],
                                                                 tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    sources: list[Any] = [str(real_photos[0]), str(bad), real_photos[1].read_bytes(), str(tmp_path / "missing.jpg"),
                          str(real_photos[2]), str(real_photos[0])]
    with load(built.out, artifact="onnx-int8") as s:
        serial = _plain(list(s.screen_many(sources)))
        piped = _plain(list(s.screen_many(sources, pipeline=True)))
    assert piped == serial
    assert [r["source"] for r in piped] == [str(x) if not isinstance(x, bytes) else "<bytes>" for x in sources]
    assert [r["ok"] for r in piped] == [True, False, True, False, True, True]
    assert piped[1]["error"]["code"] == "decode-failed" and piped[3]["error"]["code"] == "not-found"
    assert piped[0]["probability"] == piped[5]["probability"]  # the same image twice, buffers not mixed up


def test_overlapped_order_slots_and_errors() -> None:
    seen: list[tuple[int, int]] = []

    def first(x: int, slot: int) -> tuple[int, int]:
        seen.append((x, slot))
        if x == 3:
            raise ValueError("item 3")
        return x, slot

    got: list[int] = []
    with pytest.raises(ValueError, match="item 3"):
        for x, _slot in overlapped(range(6), first, lambda p: p):
            got.append(x)
    assert got == [0, 1, 2]  # raised where the serial loop would raise, after the results before it
    slots = dict(seen)
    assert all(slots[i] != slots[i + 1] for i in range(3))  # neighbours (in flight together) never share a slot
    assert list(overlapped([], first, lambda p: p)) == []


def test_screen_cli_pipeline_matches_serial(built: Any, real_photos: list[Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x.jpg"
    bad.write_text("not an image")
    docs = []
    for mode in ("off", "on"):
        code = main(["screen", "--bundle", str(built.out), str(real_photos[0]), str(bad), str(real_photos[1]),
                     "--pipeline", mode, "--json"])
        assert code == 10
        docs.append(json.loads(capsys.readouterr().out))
    strip = [[{k: v for k, v in r.items() if k != "timings_ms"} for r in d["results"]] for d in docs]
    assert strip[0] == strip[1] and [r["ok"] for r in strip[1]] == [True, False, True]


def test_use_pipeline_choice() -> None:
    assert use_pipeline("on", 1) and not use_pipeline("off", 10)
    assert use_pipeline("auto", 10, cores=2) and not use_pipeline("auto", 10, cores=1)
    assert not use_pipeline("auto", 1, cores=4)
    # pipelined with several inference threads: onnxruntime's idle threads stop spinning (unless set explicitly)
    assert pipeline_settings(BackendSettings(threads=2), True).allow_spinning is False
    assert pipeline_settings(BackendSettings(threads=0), True).allow_spinning is False
    assert pipeline_settings(BackendSettings(threads=1), True).allow_spinning is None
    assert pipeline_settings(BackendSettings(threads=2), False).allow_spinning is None
    assert pipeline_settings(BackendSettings(threads=2, allow_spinning=True), True).allow_spinning is True


# ---------------------------------------------------------------------------------------------- ORT options
def test_onnxruntime_session_options_come_from_the_settings(built: Any, real_photos: list[Path]) -> None:
    from fundus_edge.runtime.backends import create_backend

    bundle = load_bundle(built.out)
    path = bundle.path(bundle.artifact("onnx-fp32"))
    tuned = BackendSettings(threads=1, graph_optimization="basic", mem_arena=False, mem_pattern=False,
                            allow_spinning=False)
    with create_backend("onnx", path, tuned) as b, create_backend("onnx", path) as d:
        o = b.session_options  # type: ignore[attr-defined]
        assert not o.enable_cpu_mem_arena and not o.enable_mem_pattern
        assert o.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert str(o.graph_optimization_level).endswith("ORT_ENABLE_BASIC")
        od = d.session_options  # type: ignore[attr-defined]
        assert od.enable_cpu_mem_arena and od.enable_mem_pattern
        assert str(od.graph_optimization_level).endswith("ORT_ENABLE_ALL")
        with load(bundle) as s:
            x = s.prepare(str(real_photos[0])).tensor
        assert x is not None
        np.testing.assert_allclose(b.infer(x), d.infer(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(UsageError, match="graph_optimization"):
        BackendSettings(graph_optimization="fast")


# ---------------------------------------------------------------------------------------------- field pipeline
def _field_rows(recs: list[Any]) -> list[tuple[Any, ...]]:
    return [(r.source, r.image_sha256, r.ok, r.decision, r.probability, r.error_code, bool(r.extra.get("stored")))
            for r in recs]


def test_field_pipeline_keeps_store_semantics(built: Any, real_photos: list[Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from fundus_edge.runtime.field.audit import AuditLog
    from fundus_edge.runtime.field.session import Patient, open_session
    from fundus_edge.runtime.field.store import ResultStore

    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    dup = tmp_path / "dup.jpg"
    dup.write_bytes(real_photos[0].read_bytes())
    batch = [str(real_photos[0]), str(bad), str(real_photos[1]), str(dup), str(tmp_path / "missing.jpg")]
    got = {}
    for mode in ("serial", "pipelined"):
        db = tmp_path / f"{mode}.db"
        with ResultStore(db) as store, open_session(built.out, store=store) as session:
            got[mode] = _field_rows(list(session.screen_files(batch, Patient(), pipeline=mode == "pipelined")))
    assert got["pipelined"] == got["serial"]
    stored = [row[-1] for row in got["pipelined"]]
    assert stored == [False, False, False, True, False]  # the duplicate in the batch comes from the store
    assert [row[5] for row in got["pipelined"]] == [None, "not-an-image", None, None, "not-found"]

    # a re-run over the same store: every readable image from the store, none decoded by the worker
    audit = AuditLog(tmp_path / "a.jsonl")
    with ResultStore(tmp_path / "pipelined.db") as store, open_session(built.out, store=store,
                                                                      audit=audit) as session:
        prepared: list[int] = []
        real_prepare = session.screener.prepare

        def counting(data: Any, slot: int = 0) -> Any:
            prepared.append(slot)
            return real_prepare(data, slot)

        monkeypatch.setattr(session.screener, "prepare", counting)
        again = list(session.screen_files(batch, pipeline=True))
    audit.close()
    assert [bool(r.extra.get("stored")) for r in again] == [True, True, True, True, False] and not prepared


def test_field_pipeline_stop_and_contained_worker_failure(built: Any, real_photos: list[Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from fundus_edge.runtime.field.audit import AuditLog
    from fundus_edge.runtime.field.session import open_session
    from fundus_edge.runtime.field.store import ResultStore

    stop = threading.Event()
    batch = [str(p) for p in real_photos[:4]]
    audit = AuditLog(tmp_path / "a.jsonl")
    with ResultStore(tmp_path / "r.db") as store, open_session(built.out, store=store, audit=audit) as session:
        real_prepare = session.screener.prepare
        calls = [0]

        def flaky(data: Any, slot: int = 0) -> Any:
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("simulated worker fault")
            return real_prepare(data, slot)

        monkeypatch.setattr(session.screener, "prepare", flaky)
        it = session.screen_files(batch, pipeline=True, stop=stop)
        first, second = next(it), next(it)
        stop.set()
        rest = list(it)
        n_rows = store.count()
        stop.clear()
        stop.set()
        assert list(session.screen_files(batch, pipeline=True, stop=stop)) == []  # stopped before the first
    audit.close()
    assert first.ok and second.error_code == "internal-error"
    assert "simulated worker fault" in (second.error_message or "")
    assert rest == [] and n_rows == 2  # nothing completed after the stop
    events = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert any(e["event"] == "internal-error" and e["exception"] == "RuntimeError" for e in events)
