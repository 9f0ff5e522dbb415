"""The emulated Raspberry Pi 4: real aarch64 wheels under QEMU user mode, parity with x86, the offline package.

The emulation root is built once per run into the user cache dir (``emulate setup``); when it cannot be built
(no qemu-user/debootstrap, no network to the Debian mirror or PyPI) these tests FAIL with the reason: CI must
not pass without the emulated device. ``make emulation-tools`` installs the host tools.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fundus_edge.cli import main
from fundus_edge.devices import get_profile
from fundus_edge.errors import FundusEdgeError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def emulation_root() -> Path:
    from fundus_edge.devices.emuroot import setup

    try:
        res = setup(log=lambda s: print(s, file=sys.stderr))
    except FundusEdgeError as exc:
        pytest.fail(f"the aarch64 emulation root could not be built ({type(exc).__name__}): {exc}\n"
                    "Install the host tools with 'make emulation-tools' (root, apt) and allow access to the "
                    "Debian mirror and PyPI.", pytrace=False)
    print(f"emulation root: {res.to_dict()}", file=sys.stderr)
    return res.base


@pytest.fixture(scope="module")
def pi4_images(synth_val: Path, real_photos: list[Path], tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """20 images (15 synthetic fundus photographs, the 5 CC0 real ones) and a file that is not an image."""
    broken = tmp_path_factory.mktemp("broken") / "not-a-photo.jpg"
    broken.write_bytes(b"this is not a JPEG")
    return [*map(str, sorted(synth_val.parent.glob("*.jpg"))[:15]), *map(str, real_photos[:5]), str(broken)]


@pytest.fixture(scope="module")
def pi4_report(built: Any, emulation_root: Path, pi4_images: list[str]) -> Any:
    from fundus_edge.devices.emulate import EmulateConfig, run_emulate

    return run_emulate(EmulateConfig(profile=get_profile("rpi4"), bundle=built.out, images=pi4_images,
                                     precision="int8"), log=lambda s: print(s, file=sys.stderr))


def test_second_setup_reuses_the_cache(emulation_root: Path) -> None:
    from fundus_edge.devices.emuroot import setup

    res = setup(log=lambda s: None)
    assert res.rootfs_reused and all(res.sites_reused.values())
    assert res.versions["machine"] == "aarch64" and res.versions["onnxruntime"]
    print(f"cached setup: {res.seconds:.1f} s", file=sys.stderr)


def test_emulated_pi4_int8_matches_x86(pi4_report: Any, pi4_images: list[str]) -> None:
    import onnxruntime

    from fundus_edge.devices.choice import runnable_formats

    rep = pi4_report
    # every int8 artifact this runtime can run: ONNX (onnxruntime), and TFLite (LiteRT) when the bundle has it
    assert rep.artifacts == [a.id for a in rep.bundle.artifacts if a.precision == "int8"
                             and a.format in runnable_formats()]
    assert "onnx-int8" in rep.artifacts
    doc = rep.to_dict()
    emu = doc["emulated"]
    assert emu["machine"] == "aarch64" and emu["cpu"] == "cortex-a72"
    assert emu["versions"]["onnxruntime"] == onnxruntime.__version__  # the same version, built for aarch64
    assert [p.artifact for p in rep.parities] == rep.artifacts
    for par in rep.parities:
        assert par and par.n == len(pi4_images) == 21 and par.compare.n == 20  # the broken file fails on both
        assert par.errors_agree and par.inputs_identical == 20
        assert par.lsb and par.max_lsb is not None and par.max_lsb <= 1.0
        assert par.compare.decision_agreement == 1.0
        native = doc["native"][par.artifact]["results"]
        arm = emu["artifacts"][par.artifact]["results"]
        assert [r.get("decision") for r in arm] == [r.get("decision") for r in native]
        assert [r["ok"] for r in arm] == [True] * 20 + [False]
        assert arm[-1]["error"]["code"] == "not-an-image"
        assert "timings_ms" not in arm[0] and "emulator_timings_ms_not_device_latency" in arm[0]
    assert rep.fits_ok and doc["parity_ok"]
    text = rep.text()
    assert "parity x86_64 vs arm64" in text and "PASS" in text
    assert "not device" in text and " ms" not in text  # emulator time is never shown as latency
    print(text, file=sys.stderr)


def test_a_parity_failure_exits_non_zero(pi4_report: Any, pi4_images: list[str], built: Any,
                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The emulated outputs of the real run, moved by two output LSBs on one image, must fail the command."""
    from fundus_edge.devices import emulate as emulate_mod
    from fundus_edge.devices.parity import parity

    rep = pi4_report
    ok = next(p for p in rep.parities if p.artifact == "onnx-int8")
    assert rep.emulated is not None
    moved = rep.emulated.outputs["onnx-int8"].copy()
    moved[0, 0] += 2 * ok.lsb
    nat = rep.native["onnx-int8"]
    bad = parity("onnx-int8", "int8", nat.outputs["onnx-int8"], moved, nat.result["artifacts"]["onnx-int8"]["results"],
                 rep.emulated.result["artifacts"]["onnx-int8"]["results"], rep.bundle.positive_classes,
                 rep.bundle.operating_point.threshold, ok.lsb)
    assert not bad and bad.max_lsb == pytest.approx(2.0, abs=1e-3)
    others = [p for p in rep.parities if p.artifact != "onnx-int8"]
    monkeypatch.setattr(emulate_mod, "run_emulate",
                        lambda cfg, log=None: dataclasses.replace(rep, parities=[bad, *others]))
    code = main(["emulate", "--device", "rpi4", "--bundle", str(built.out), "--precision", "int8", *pi4_images])
    captured = capsys.readouterr()
    assert code == 11
    assert "FAIL" in captured.out and "parity failed for onnx-int8" in captured.err


def test_offline_package_installs_and_screens_in_the_emulated_pi4(built: Any, emulation_root: Path,
                                                                  real_photos: list[Path], tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dist" / "rpi4"
    unit = tmp_path / "fundus-edge-watch.service"  # e.g. the watch-mode unit of the field-reliability work
    unit.write_text("[Service]\nExecStart=@PREFIX@/venv/bin/fundus-edge screen --device @DEVICE@ --bundle @BUNDLE@ "
                    "--artifact @ARTIFACT@ --threads @THREADS@\n")
    assert main(["package", "--device", "rpi4", "--bundle", str(built.out), "--out", str(out), "--unit-file",
                 str(unit), "--json"]) == 0
    pkg = json.loads(capsys.readouterr().out)
    shipped = (out / "systemd" / unit.name).read_text()
    assert f"--device rpi4 --bundle @PREFIX@/bundle --artifact {pkg['artifact']['artifact_id']} --threads 4" in shipped
    assert Path(pkg["tarball"]).is_file() and (out / "install.sh").is_file() and (out / "SHA256SUMS").is_file()
    reqs = [line for line in (out / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert all("==" in r and "--hash=sha256:" in r for r in reqs)
    wheels = {w.name.split("-")[0] for w in (out / "wheelhouse").glob("*.whl")}
    assert {"fundus_edge", "numpy", "pillow", "onnxruntime", "pip"} <= wheels
    assert all("aarch64" in w.name or "none-any" in w.name or "abi3" in w.name
               for w in (out / "wheelhouse").glob("*.whl"))
    from fundus_edge.devices.config import read_device_table

    config = read_device_table(out / "device.toml")
    assert config["profile"] == "rpi4" and config["artifact"] == pkg["artifact"]["artifact_id"]
    print(f"package: {pkg['megabytes']} MB, wheelhouse {pkg['wheelhouse_megabytes']} MB", file=sys.stderr)

    imgs = [str(real_photos[0]), str(real_photos[-1])]
    code = main(["emulate", "--device", "rpi4", "--install-package", str(out), "--prefix", str(tmp_path / "opt"),
                 *imgs, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    installed_unit = (Path(doc["prefix"]) / "systemd" / unit.name).read_text()
    assert f"ExecStart={doc['prefix']}/venv/bin/fundus-edge screen --device rpi4 --bundle {doc['prefix']}/bundle" \
        in installed_unit
    screen = doc["screen"]
    assert screen["artifact"] == config["artifact"] and screen["summary"]["errors"] == 0
    from fundus_edge.runtime import load

    with load(built.out, artifact=config["artifact"]) as s:
        here = [s.screen(i) for i in imgs]
    got = screen["results"]
    assert [r["decision"] for r in got] == [h.decision for h in here]
    assert np.allclose([r["probability"] for r in got], [h.probability for h in here], atol=1e-4)
    print(f"emulated install {doc['install_emulator_seconds']} s, screen "
          f"{doc['screen_emulator_seconds_not_device_latency']} s (emulator time)", file=sys.stderr)


def test_doctor_inside_the_emulated_pi_zero(emulation_root: Path) -> None:
    """doctor on the arm64 Python names the board from the view's device tree and imports the aarch64 backends."""
    import subprocess

    from fundus_edge.devices.emuroot import open_root

    root = open_root(emulation_root.parent.parent)
    cmd, env = root.python_command(get_profile("rpi-zero-2w"), ["-m", "fundus_edge", "doctor", "--json"])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert doc["profile"] == "rpi-zero-2w" and doc["detection"]["matched_by"] == "device-tree"
    assert doc["system"]["machine"] == "aarch64"
    assert doc["detection"]["evidence"]["cpu_cores"] == ["Cortex-A53"]
    checks = {c["what"]: c for c in doc["checks"]}
    assert checks["onnxruntime"]["ok"] and checks["litert"]["ok"]


def test_check_gates_the_emulated_pi4_outputs(built: Any, emulation_root: Path, synth_val: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`check --device rpi4` on 8 images: the gated int8 scores are the emulated worker's outputs, named as such."""
    import onnxruntime

    from fundus_edge.gate.gate import gate
    from fundus_edge.pipeline import check as check_mod
    from fundus_edge.pipeline import device_gate as dg
    from fundus_edge.runtime.postprocess import referable_probability

    runs: list[Any] = []
    results: list[Any] = []
    real_worker, real_check = dg.run_worker, check_mod.run_check
    monkeypatch.setattr(dg, "run_worker", lambda *a, **k: runs.append(real_worker(*a, **k)) or runs[-1])
    monkeypatch.setattr(check_mod, "run_check", lambda *a, **k: results.append(real_check(*a, **k)) or results[-1])
    code = main(["check", "--bundle", str(built.out), "--val", str(synth_val), "--artifact", "onnx-int8",
                 "--device", "rpi4", "--device-images", "8"])
    text = capsys.readouterr().out
    res = results[0]
    assert code == {"PASS": 0, "INSUFFICIENT EVIDENCE": 15}.get(res.verdict, 8)
    dev = res.device
    assert dev is not None and len(runs) == 1 and runs[0].result["machine"] == "aarch64"
    assert dev.emulated and dev.machine == "aarch64" and dev.cpu == "cortex-a72"
    assert dev.versions["onnxruntime"] == onnxruntime.__version__
    assert len(dev.images) == 8 == len(set(dev.indices))
    y = res.evaluations["onnx-fp32"]  # the host's reference evaluation covers all images; the device a sample
    assert y.n == 300 and dev.outcome.reference_eval.n == 8
    labels = dev.outcome.gates[0].candidate_eval.confusion
    assert labels["tp"] + labels["fn"] >= 1 and labels["tn"] + labels["fp"] >= 1  # both classes in the sample
    # the scores the device gate used are the emulated worker's outputs, through the runtime's post-processing
    emu = referable_probability(runs[0].outputs["onnx-int8"], res_positive(built))
    assert np.array_equal(np.asarray(dev.scores["onnx-int8@rpi4"], dtype=np.float32), emu.astype(np.float32))
    g = dev.device_gates[0]
    assert g.artifact == "onnx-int8@rpi4" and g.verdict in ("PASS", "FAIL", "INSUFFICIENT EVIDENCE")
    sub_y = np.array([1 if s in positives(synth_val) else 0 for s in dev.images])
    again = gate("x", sub_y, np.asarray(dev.scores["onnx-fp32"]), emu, res.threshold, g.criteria)
    assert (again.flips, again.delta_auc, again.verdict) == (g.flips, g.delta_auc, g.verdict)
    diff = dev.differences[0]
    assert diff.inputs_identical == 8 and diff.max_lsb is not None and diff.max_lsb <= 1.0
    doc = res.to_dict()["device"]
    assert doc["machine"] == "aarch64" and doc["versions"]["onnxruntime"] and doc["images"] == dev.images
    assert "arm64 emulated (QEMU" in text and "onnxruntime " + onnxruntime.__version__ in text
    assert "gate onnx-int8@rpi4 (device outputs)" in text and f"device gate: {dev.verdict}" in text
    print("\n".join(dg.device_lines(dev)), file=sys.stderr)


def res_positive(built: Any) -> list[int]:
    from fundus_edge.bundle.read import load_bundle

    return load_bundle(built.out).positive_classes


def positives(labels_csv: Path) -> set[str]:
    """The referable images of a labels CSV (grade >= 2), by resolved path, read with the project's reader."""
    from fundus_edge.datasets.labels import read_labels

    val = read_labels(labels_csv, None, 2)
    return {str(p) for p, r in zip(val.paths, val.referable, strict=True) if r}


def test_device_gate_after_build_runs_the_certification_images(built: Any, emulation_root: Path) -> None:
    """`build --device rpi4 --device-gate`'s function: the report's certification images, labels and host scores."""
    from fundus_edge.pipeline.device_gate import DeviceGateConfig
    from fundus_edge.pipeline.device_gate_build import certification_indices, device_gate_after_build

    report = json.loads((built.out / "report.json").read_text())
    dev = device_gate_after_build(built.out, DeviceGateConfig("rpi4", 6, seed=1))
    cert = report["images"]["certification"]
    idx = certification_indices(report)
    assert len(dev.images) == 6 and set(dev.images) <= set(cert) and dev.machine == "aarch64"
    pos = [idx[cert.index(s)] for s in dev.images]  # positions in the build's validation order
    assert np.allclose(dev.scores["onnx-fp32"], np.asarray(report["scores"]["onnx-fp32"])[pos])
    assert set(dev.artifacts) == {a["id"] for a in report["artifacts"] if "int8" in a["id"]}
    for d in dev.differences:  # the device outputs against the build's own int8 scores of the same images
        host = np.asarray(report["scores"][d.artifact])[pos]
        assert np.max(np.abs(np.asarray(dev.scores[f"{d.artifact}@rpi4"]) - host)) <= d.max_abs_probability + 1e-6
    assert dev.verdict in ("PASS", "FAIL", "INSUFFICIENT EVIDENCE")
    searched = {"quantization": {"onnx-int8": {"fallback": {"search_images": {"indices": [0, 2]}}}},
                "labels": [0, 1, 0, 1, 1]}
    assert certification_indices(searched) == [1, 3, 4]
