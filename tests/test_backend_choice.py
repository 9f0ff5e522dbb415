"""Backends by what is installed: a ``[litert]``-only or ``[onnx]``-only install chooses among the artifacts whose
backend it has (default artifact, ``screen --device auto``, doctor, bench, emulate), and says so.

The install is simulated by patching the installed-package check (``runtime.backends.package_installed``); the
backends themselves are real, so the screening that follows runs for real.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fundus_edge.bundle.read import Bundle
from fundus_edge.devices import doctor as doctor_mod
from fundus_edge.devices.choice import choose_artifact, runnable_formats
from fundus_edge.devices.doctor import Check, run_doctor
from fundus_edge.devices.package import device_formats
from fundus_edge.devices.profile import get_profile
from fundus_edge.errors import MissingDependencyError
from fundus_edge.runtime import backends
from fundus_edge.runtime.screen import pick_artifact

ONNX_ONLY = {"onnxruntime"}
LITERT_ONLY = {"ai_edge_litert"}


def simulate(monkeypatch: pytest.MonkeyPatch, installed: set[str]) -> None:
    """Only the packages in ``installed`` count as installed (the runtime's find_spec check)."""
    monkeypatch.setattr(backends, "package_installed", lambda name: name in installed)


def fake_bundle(default: str = "onnx-int8", failed: tuple[str, ...] = ()) -> Bundle:
    """The v1 fixture bundle's manifest with TFLite twins of its two ONNX artifacts (no files are read)."""
    from fundus_edge.bundle.manifest import Manifest

    m = json.loads((Path(__file__).parent / "data" / "bundles" / "v1" / "manifest.json").read_text())
    for a in list(m["artifacts"]):
        twin = {**a, "id": a["id"].replace("onnx", "tflite"), "path": a["path"].replace(".onnx", ".tflite"),
                "format": "tflite", "layout": "NHWC"}
        twin.pop("sha256", None)
        m["artifacts"].append(twin)
        m["files"][twin["path"]] = m["files"][a["path"]]
    m["default_artifact"] = default
    for aid in ("onnx-int8", "tflite-int8", "tflite-fp32"):
        m["gate"]["summary"][aid] = {**m["gate"]["summary"]["onnx-int8"], "passed": aid not in failed}
    return Bundle(Path("/nonexistent"), Manifest.from_dict(m), "0" * 64)


def test_runnable_formats_are_what_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate(monkeypatch, LITERT_ONLY)
    assert runnable_formats() == {"tflite"}
    simulate(monkeypatch, ONNX_ONLY)
    assert runnable_formats() == {"onnx"}
    simulate(monkeypatch, {"tflite_runtime"})
    assert runnable_formats() == {"tflite"}
    simulate(monkeypatch, set())
    assert runnable_formats() == set()


def test_the_real_check_finds_this_environment() -> None:
    import importlib.util

    expected = {f for f, names in backends.BACKEND_PACKAGES.items()
                if any(importlib.util.find_spec(n) is not None for n in names)}
    assert backends.installed_formats() == expected
    assert not backends.package_installed("no_such_package_fundus_edge")


def test_default_artifact_falls_back_to_an_installed_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    b = fake_bundle()
    simulate(monkeypatch, LITERT_ONLY)
    art, note = pick_artifact(b)
    assert art.id == "tflite-int8"  # the same precision as the default
    assert note and "onnx-int8" in note and "onnxruntime" in note and "tflite-int8" in note
    # an id given explicitly is used as given (its backend then says what to install)
    assert pick_artifact(b, artifact="onnx-int8") == (b.artifact("onnx-int8"), None)
    # --format onnx in a litert-only install: no substitute of another format
    assert pick_artifact(b, fmt="onnx")[0].format == "onnx"
    simulate(monkeypatch, ONNX_ONLY)
    assert pick_artifact(b) == (b.artifact("onnx-int8"), None)


def test_fallback_skips_artifacts_that_failed_the_gate(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate(monkeypatch, LITERT_ONLY)
    art, note = pick_artifact(fake_bundle(failed=("tflite-int8",)))
    assert art.id == "tflite-fp32" and note


def test_device_auto_choice_follows_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    b = fake_bundle()
    generic = get_profile("generic-aarch64")  # prefers onnx/int8, then tflite/int8
    simulate(monkeypatch, LITERT_ONLY)
    assert choose_artifact(generic, b.artifacts, b.spec, runnable_formats()).artifact_id == "tflite-int8"
    simulate(monkeypatch, ONNX_ONLY)
    assert choose_artifact(get_profile("rpi4"), b.artifacts, b.spec, runnable_formats()).artifact_id \
        == "onnx-int8"
    # a device package installs the profile's extras: the build machine's install does not matter
    simulate(monkeypatch, set())
    assert device_formats(get_profile("rpi4")) == {"onnx", "tflite"}
    assert device_formats(get_profile("jetson-orin-nano")) == {"onnx"}


def _checks(ok: dict[str, bool]) -> Callable[[bool], list[Check]]:
    def fake(in_process: bool = False) -> list[Check]:
        return [Check(what, ok.get(what, True), "1.0" if ok.get(what, True) else "",
                      "CPUExecutionProvider" if what == "onnxruntime" else "",
                      "" if ok.get(what, True) else "ModuleNotFoundError: simulated")
                for what, *_ in doctor_mod.CHECKS]
    return fake


def test_doctor_litert_only_is_ok_and_says_what_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate(monkeypatch, LITERT_ONLY)
    monkeypatch.setattr(doctor_mod, "check_imports", _checks({"onnxruntime": False, "tflite-runtime": False}))
    rep = run_doctor("generic-aarch64")
    assert rep.ok, rep.problems
    assert rep.system["runtime_formats"] == ["tflite"]
    assert any("it will run tflite/int8" in a for a in rep.advice)


def test_doctor_flags_an_installed_backend_that_does_not_import(monkeypatch: pytest.MonkeyPatch) -> None:
    # onnxruntime is installed (so screening would choose ONNX artifacts) but its import fails
    simulate(monkeypatch, ONNX_ONLY | LITERT_ONLY)
    monkeypatch.setattr(doctor_mod, "check_imports", _checks({"onnxruntime": False, "tflite-runtime": False}))
    rep = run_doctor("generic-aarch64")
    assert not rep.ok and rep.exit_code != 0
    assert any("onnxruntime is installed but does not import" in p for p in rep.problems)
    assert "doctor: OK" not in rep.text()


# ------------------------------------------------------------------ end to end on the built bundle (slow)
@pytest.mark.slow
def test_screen_in_a_litert_only_install(built: Any, real_photos: list[Path], monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    from fundus_edge.cli.main import main
    from fundus_edge.runtime import load

    arts = {a["id"]: a["format"] for a in json.loads((built.out / "manifest.json").read_text())["artifacts"]}
    assert "tflite" in arts.values(), "the test bundle should hold TFLite artifacts"
    simulate(monkeypatch, LITERT_ONLY)
    with load(built.out) as s:
        assert s.artifact.format == "tflite" and s.backend.name == "litert" and s.artifact_note
        assert bool(s.screen(str(real_photos[0])))
    for extra in ([], ["--device", "auto"], ["--device", "generic-aarch64"]):
        code = main(["screen", "--bundle", str(built.out), str(real_photos[0]), "--json", *extra])
        doc = json.loads(capsys.readouterr().out)
        assert code == 0, extra
        assert arts[doc["artifact"]] == "tflite" and doc["backend"] == "litert"


@pytest.mark.slow
def test_bench_and_emulate_in_an_onnx_only_install(built: Any, real_photos: list[Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from fundus_edge.devices.emulate import EmulateConfig, run_emulate
    from fundus_edge.runtime.backends import BackendSettings
    from fundus_edge.runtime.bench import format_table, run_bench

    simulate(monkeypatch, ONNX_ONLY)
    rows = run_bench(built.out, [str(real_photos[0])], BackendSettings(threads=1), repeats=1, cold=False)
    assert rows and all(r.format == "onnx" for r in rows)
    assert rows.skipped and all("not installed here" in s for s in rows.skipped)
    assert "tflite-int8 not benchmarked" in format_table(rows)
    rep = run_emulate(EmulateConfig(profile=get_profile("rpi4"), bundle=built.out, images=[str(real_photos[0])],
                                    precision="int8", arch="native", memory_cap="rlimit"), log=lambda s: None)
    assert rep.artifacts == ["onnx-int8"]
    assert any("tflite-int8 skipped" in n and "fundus-edge[litert]" in n for n in rep.notes)
    simulate(monkeypatch, set())
    with pytest.raises(MissingDependencyError):
        run_bench(built.out, [str(real_photos[0])], BackendSettings(threads=1), repeats=1, cold=False)
