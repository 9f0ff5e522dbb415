"""Device profiles, detection, doctor, artifact choice, parity rules and the resource-capped run (no QEMU here)."""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fundus_edge.cli import main
from fundus_edge.devices import detect, get_profile, list_profiles
from fundus_edge.devices.choice import choose_artifact
from fundus_edge.devices.cpufiles import cpu_files
from fundus_edge.devices.detect import read_cpu_parts
from fundus_edge.devices.emuroot import manylinux_platforms
from fundus_edge.devices.parity import parity
from fundus_edge.devices.profile import ArtifactPreference, load_profile_file, profile_from_dict
from fundus_edge.errors import DeviceError

DEVICES_DIR = Path(__file__).resolve().parent.parent / "devices"
ISSUE_DEVICES = {"rpi4", "rpi5", "rpi-zero-2w", "jetson-nano", "jetson-orin-nano", "x86-dev"}
ALL_FOUR = [{"id": f"{f}-{p}", "format": f, "precision": p} for f in ("onnx", "tflite") for p in ("fp32", "int8")]
ONNX_ONLY = [a for a in ALL_FOUR if a["format"] == "onnx"]


def _fake_root(tmp: Path, model: str | None = None, tegra: str | None = None, parts: tuple[int, ...] = ()) -> Path:
    root = tmp / "root"
    if model is not None:
        (root / "proc/device-tree").mkdir(parents=True, exist_ok=True)
        (root / "proc/device-tree/model").write_bytes(model.encode() + b"\x00")
    if tegra is not None:
        (root / "etc").mkdir(parents=True, exist_ok=True)
        (root / "etc/nv_tegra_release").write_text(tegra + "\n")
    if parts:
        (root / "proc").mkdir(parents=True, exist_ok=True)
        (root / "proc/cpuinfo").write_text("".join(f"processor\t: {i}\nCPU part\t: 0x{p:03x}\n\n"
                                                   for i, p in enumerate(parts)))
    root.mkdir(exist_ok=True)
    return root


def test_the_shipped_profiles_are_the_issues_devices_plus_a_fallback() -> None:
    names = {p.name for p in list_profiles()}
    assert names == ISSUE_DEVICES | {"generic-aarch64"}
    assert {p.stem for p in (DEVICES_DIR / "profiles").glob("*.toml")} == names


@pytest.mark.parametrize("name", sorted(ISSUE_DEVICES | {"generic-aarch64"}))
def test_every_profile_is_exercised(name: str, tmp_path: Path) -> None:
    """Load, choose artifacts, settings, emulation files, wheel platforms and detection for each profile."""
    p = get_profile(name)
    assert p.name == name and p.to_dict()["memory"]["budget_mb"] == min(p.memory.ram_mb) - p.memory.reserved_mb
    # artifact choice: the first preference when the bundle has everything; ONNX when that is all there is
    full = choose_artifact(p, ALL_FOUR)
    assert (full.format, full.precision) == (p.runtime.artifacts[0].format, p.runtime.artifacts[0].precision)
    assert not full.degraded
    onnx = choose_artifact(p, ONNX_ONLY)
    first_onnx = next(a for a in p.runtime.artifacts if a.format == "onnx")
    assert (onnx.format, onnx.precision) == (first_onnx.format, first_onnx.precision)
    assert onnx.degraded == (p.runtime.artifacts[0].format != "onnx")
    # backend settings come from the profile
    s = p.backend_settings()
    assert s.threads == p.runtime.threads and s.providers == p.runtime.providers
    assert p.backend_settings(threads=1).threads == 1
    # install facts are usable by the packager
    plats = manylinux_platforms(p.arch, p.install.glibc_tuple)
    assert plats[0] == f"manylinux_{p.install.glibc.replace('.', '_')}_{p.arch}"
    assert plats[-1].startswith("manylinux2014")
    assert p.install.pip and p.install.python_tuple >= (3, 6)
    if p.arch == "aarch64":
        # fake CPU files for QEMU describe exactly this core, as many times as the device has cores
        files = cpu_files(p)
        assert read_cpu_parts(files["proc/cpuinfo"]) == [p.cpu.part] * p.cpu.cores
        assert files["sys/devices/system/cpu/possible"].strip() == f"0-{p.cpu.cores - 1}"
        assert p.cpu.qemu_cpu and p.cpu.qemu_cpu != "max"
    # detection finds it from its own signature
    if p.detect.device_tree_model:
        found = detect(_fake_root(tmp_path, model=p.detect.device_tree_model[0] + " Rev 1.0"), machine=p.arch)
        assert (found.profile.name, found.matched_by, found.warnings) == (name, "device-tree", ())
    elif p.detect.machine:
        found = detect(_fake_root(tmp_path), machine=p.detect.machine[0])
        assert (found.profile.name, found.matched_by) == (name, "machine")
    else:
        assert p.detect.fallback
        found = detect(_fake_root(tmp_path, model="Some Vendor SBC"), machine="aarch64")
        assert found.profile.name == name and found.matched_by == "fallback" and found.warnings


def test_jetson_profiles_say_what_is_unsupported() -> None:
    nano, orin = get_profile("jetson-nano"), get_profile("jetson-orin-nano")
    assert not nano.supported and "Python 3.6" in nano.unsupported and "glibc" in nano.unsupported
    assert orin.supported and orin.install.python == "3.10"
    for p in (nano, orin):
        assert p.runtime.providers == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def test_profile_validation_names_the_problem(tmp_path: Path) -> None:
    good = (DEVICES_DIR / "profiles" / "rpi4.toml").read_text()
    cases = {
        'qemu_cpu = "cortex-a72"': ('qemu_cpu = "max"', "max"),
        'arch = "aarch64"': ('arch = "riscv64"', "arch"),
        'backends = ["litert", "onnxruntime"]': ('backends = ["onnxruntime"]', "needs backend 'litert'"),
        'threads = 4': ('threads = -1', "threads"),
    }
    for old, (new, expect) in cases.items():
        f = tmp_path / "bad.toml"
        f.write_text(good.replace(old, new))
        with pytest.raises(DeviceError, match=re.escape(expect)):
            load_profile_file(f)
    with pytest.raises(DeviceError, match="FORMAT/PRECISION"):
        ArtifactPreference.parse("onnx-int8")
    doc = {"name": "x", "description": "x", "arch": "x86_64", "supported": False, "cpu": {"cores": 1, "model": "x"},
           "memory": {"ram_mb": [512], "reserved_mb": 10},
           "runtime": {"artifacts": ["onnx/int8"], "backends": ["onnxruntime"], "threads": 1, "latency_budget_ms": 1},
           "install": {"os": "x", "python": "3.11", "glibc": "2.36", "pip": "pip"}}
    with pytest.raises(DeviceError, match="must say why"):
        profile_from_dict(doc)
    # a profile file given by path works like a shipped one (a user's own board)
    own = tmp_path / "my-board.toml"
    own.write_text(good.replace('name = "rpi4"', 'name = "my-board"'))
    assert get_profile(str(own)).name == "my-board"


def test_choose_artifact_degrades_and_respects_the_gate() -> None:
    rpi4 = get_profile("rpi4")
    c = choose_artifact(rpi4, ONNX_ONLY)
    assert c.artifact_id == "onnx-int8" and c.degraded and "tflite/int8" in c.reason
    c = choose_artifact(rpi4, ONNX_ONLY, {"onnx-int8": False})  # gate verdicts: artifact id -> passed
    assert c.artifact_id == "onnx-fp32" and any("failed the clinical gate" in s for s in c.skipped)
    # tflite artifacts present but no LiteRT backend in this runtime: ONNX
    c = choose_artifact(rpi4, ALL_FOUR, runnable_formats={"onnx"})
    assert c.artifact_id == "onnx-int8" and any("no litert backend" in s for s in c.skipped)
    with pytest.raises(DeviceError, match="no artifact of this bundle"):
        choose_artifact(rpi4, ALL_FOUR, runnable_formats=set())


def test_detection_of_boards_and_fallbacks(tmp_path: Path) -> None:
    d = detect(_fake_root(tmp_path / "a", model="Raspberry Pi Zero 2 W Rev 1.0", parts=(0xD03,) * 4), "aarch64")
    assert d.profile.name == "rpi-zero-2w" and d.evidence["cpu_cores"] == ["Cortex-A53"]
    d = detect(_fake_root(tmp_path / "b", model="Raspberry Pi 4 Model B Rev 1.4"), "armv7l")
    assert d.profile.name == "rpi4" and "32-bit" in d.warnings[0]
    d = detect(_fake_root(tmp_path / "c", model="NVIDIA Jetson Nano Developer Kit",
                          tegra="# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64"),
               "aarch64")
    assert d.profile.name == "jetson-nano" and d.evidence["l4t_release"] == "R32"
    d = detect(_fake_root(tmp_path / "d", tegra="# R36 (release), REVISION: 4.0, BOARD: generic, EABI: aarch64"),
               "aarch64")
    assert d.profile.name == "jetson-orin-nano" and d.matched_by == "tegra-release" and d.warnings
    d = detect(_fake_root(tmp_path / "e", tegra="# R35 (release), REVISION: 6.0"), "aarch64")
    assert d.profile.name == "generic-aarch64" and "R35" in d.warnings[0]
    d = detect(_fake_root(tmp_path / "f", model="Pine64 RockPro64", parts=(0xD08, 0xD08)), "aarch64")
    assert d.profile.name == "generic-aarch64" and d.matched_by == "fallback"
    assert any("rpi4" in w for w in d.warnings)  # same CPU as the Pi 4: said, not assumed


def test_doctor_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    import platform

    code = main(["doctor", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["ok"]
    if platform.machine() == "x86_64":
        assert doc["profile"] == "x86-dev" and doc["detection"]["matched_by"] == "machine"
    checks = {c["what"]: c for c in doc["checks"]}
    assert checks["onnxruntime"]["ok"] and "CPUExecutionProvider" in checks["onnxruntime"]["detail"]
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert f"profile: {doc['profile']}" in text and "why:" in text and "onnxruntime" in text


def test_doctor_for_a_device_and_a_captured_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _fake_root(tmp_path, model="Raspberry Pi 5 Model B Rev 1.0", parts=(0xD0B,) * 4)
    assert main(["doctor", "--root", str(root), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["detection"]["profile"] == "rpi5" and doc["profile"] == "rpi5"
    # the Jetson Nano cannot run the runtime: doctor says so and exits non-zero
    assert main(["doctor", "--device", "jetson-nano"]) == 12
    out = capsys.readouterr().out
    assert "not supported" in out and "TensorrtExecutionProvider" in out


def test_devices_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices"]) == 0
    out = capsys.readouterr().out
    for name in ISSUE_DEVICES:
        assert name in out
    assert main(["devices", "rpi-zero-2w", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory"]["ram_mb"] == [512]
    assert main(["devices", "rpi-4"]) == 2
    assert "Did you mean 'rpi4'" in capsys.readouterr().err


def test_devices_package_never_imports_the_toolchain() -> None:
    banned = {"torch", "torchvision", "onnx", "onnxscript", "litert_torch", "ai_edge_quantizer", "tensorflow"}
    for path in DEVICES_DIR.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            assert not {n.split(".")[0] for n in names} & banned, f"{path.name} imports {names}"


def test_parity_rules() -> None:
    rng = np.random.default_rng(0)
    lsb = 0.05
    host = np.round(rng.normal(0, 2, (20, 5)) / lsb) * lsb
    res = [{"input_sha256": str(i)} for i in range(20)]
    one_lsb = host.copy()
    one_lsb[3, 2] += lsb
    p = parity("int8", "int8", host, one_lsb, res, res, [2, 3, 4], 0.5, lsb)
    assert p and p.max_lsb == pytest.approx(1.0) and p.inputs_identical == 20
    two_lsb = host.copy()
    two_lsb[3, 2] += 2 * lsb
    assert not parity("int8", "int8", host, two_lsb, res, res, [2, 3, 4], 0.5, lsb)
    f = rng.normal(0, 3, (20, 5))
    assert parity("fp32", "fp32", f, f * (1 + 2e-6), res, res, [2, 3, 4], 0.5, None)
    assert not parity("fp32", "fp32", f, f + 1e-3, res, res, [2, 3, 4], 0.5, None)
    # a flipped referral decision fails even within one LSB (the threshold sits between the two scores)
    two = np.array([[0.0, 0.0], [1.0, -1.0]])
    flipped = two + np.array([[0.0, lsb], [0.0, 0.0]])
    p = parity("int8", "int8", two, flipped, res[:2], res[:2], [1], 0.505, lsb)
    assert not p and p.compare.failures == ("decision agreement 0.500 < 1.0",)


def test_output_lsb_matches_onnx(built: Any) -> None:
    import onnx
    from onnx import numpy_helper

    from fundus_edge.devices.onnx_lsb import output_lsb

    m = onnx.load(str(built.out / "model.int8.onnx"))
    inits = {i.name: i for i in m.graph.initializer}
    dq = next(n for n in m.graph.node if m.graph.output[0].name in n.output)
    assert dq.op_type == "DequantizeLinear"
    expect = float(numpy_helper.to_array(inits[dq.input[1]]))
    assert output_lsb(built.out / "model.int8.onnx") == pytest.approx(expect, rel=1e-7)
    assert output_lsb(built.out / "model.fp32.onnx") is None


def test_capped_run_reports_peak_rss_against_the_pi_zero(built: Any, real_photos: list[Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    imgs = [str(p) for p in real_photos[:2]]
    code = main(["emulate", "--device", "rpi-zero-2w", "--arch", "native", "--bundle", str(built.out),
                 "--precision", "int8", *imgs, "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["fits_ok"], json.dumps(doc)[:3000]
    fit = doc["fits"][0]
    assert fit["ram_mb"] == 512 and fit["budget_mb"] == 512 - 160
    assert 20 < fit["peak_rss_mb"] < fit["budget_mb"]  # measured by the kernel, not assumed
    assert len(doc["caps"]["cores"]) <= 4 and doc["caps"]["threads"] == 4
    native = doc["native"]["onnx-int8"]
    assert [r["ok"] for r in native["results"]] == [True, True]
    # the same bundle on a board with less RAM than it needs: exit 12 and a reason
    code = main(["emulate", "--device", "rpi-zero-2w", "--ram-mb", "200", "--arch", "native", "--bundle",
                 str(built.out), "--precision", "int8", imgs[0]])
    captured = capsys.readouterr()
    assert code == 12
    assert "does NOT fit" in captured.out and "does not fit rpi-zero-2w" in captured.err


def test_capped_run_under_an_address_space_cap(built: Any, real_photos: list[Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["emulate", "--device", "rpi4", "--arch", "native", "--memory-cap", "rlimit", "--bundle",
                 str(built.out), "--precision", "int8", "--threads", "1", str(real_photos[0]), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["caps"]["memory_cap"] == "rlimit" and doc["fits_ok"]


def test_screen_and_build_take_a_device(built: Any, real_photos: list[Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["screen", "--device", "rpi4", "--bundle", str(built.out), str(real_photos[0]), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    from fundus_edge.devices.choice import runnable_formats

    manifest = json.loads((built.out / "manifest.json").read_text())
    gate = manifest["gate"]["summary"]
    allowed = bool(manifest["gate"].get("allow_insufficient_evidence"))  # INSUFFICIENT EVIDENCE, allowed at build

    def ok(e: dict[str, Any]) -> bool:
        return bool(e["passed"]) or (allowed and e.get("verdict") == "INSUFFICIENT EVIDENCE")

    usable = {(a["format"], a["precision"]): a["id"] for a in manifest["artifacts"]
              if ok(gate.get(a["id"], {"passed": True})) and a["format"] in runnable_formats()}
    # rpi4 prefers tflite/int8, then onnx/int8: the first the bundle has (and whose gate passed)
    expected = next(usable[(p.format, p.precision)] for p in get_profile("rpi4").runtime.artifacts
                    if (p.format, p.precision) in usable)
    assert doc["artifact"] == expected and doc["artifact"].endswith("int8")
    from fundus_edge.devices.build_target import device_default

    class G:
        def __init__(self, artifact: str, passed: bool) -> None:
            self.artifact, self.passed = artifact, passed

    arts = [{"id": "onnx-fp32", "format": "onnx", "precision": "fp32"},
            {"id": "onnx-int8", "format": "onnx", "precision": "int8"}]
    default, entry = device_default("jetson-nano", arts, [G("onnx-int8", True)], "onnx-int8", lambda s: None)
    assert default == "onnx-fp32" and entry["profile"] == "jetson-nano"  # the Nano prefers fp32 (no int8 on Maxwell)
    default, entry = device_default("rpi4", arts, [G("onnx-int8", True)], "onnx-int8", lambda s: None)
    assert default == "onnx-int8" and entry["not_built"] == ["tflite/int8", "tflite/fp32"]
    assert main(["build", "--model", "reference:dr-resnet18s", "--calib", "x", "--val", "y.csv", "--out",
                 "z", "--device", "rpi-9"]) == 2


def test_setup_tool_script_is_shipped_and_strict() -> None:
    script = (DEVICES_DIR / "install-emulation-tools.sh").read_text()
    assert "exit 1" in script and "qemu" in script and "debootstrap" in script
    r = subprocess.run(["sh", "-n", str(DEVICES_DIR / "install-emulation-tools.sh")], capture_output=True)
    assert r.returncode == 0, r.stderr


def test_doctor_names_what_to_install_when_no_backend_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    from fundus_edge.devices import doctor

    def fake_checks(in_process: bool = False) -> list[doctor.Check]:
        return [doctor.Check("numpy", True, "2.0"), doctor.Check("pillow", True, "11.0"),
                doctor.Check("onnxruntime", False, error="ModuleNotFoundError: No module named 'onnxruntime'"),
                doctor.Check("litert", False, error="ModuleNotFoundError"),
                doctor.Check("tflite-runtime", False, error="ModuleNotFoundError")]

    monkeypatch.setattr(doctor, "check_imports", fake_checks)
    rep = doctor.run_doctor("rpi4")
    assert rep.exit_code == 3 and not rep.ok
    assert any(get_profile("rpi4").install.pip in a for a in rep.advice)
    assert "NOT importable" in rep.text()


def test_screen_with_a_store_honours_the_device(built: Any, real_photos: list[Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The field path (store, watch, trust policy) takes --device and the default thread count too."""
    db = tmp_path / "r.db"
    assert main(["screen", "--bundle", str(built.out), "--store", str(db), str(real_photos[0]), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main(["screen", "--bundle", str(built.out), "--store", str(tmp_path / "r2.db"), "--device",
                 "jetson-nano", str(real_photos[0]), "--json"]) == 0
    nano = json.loads(capsys.readouterr().out)
    assert plain["artifact"] == built.manifest["default_artifact"] and nano["artifact"] == "onnx-fp32"


def test_package_device_config_drives_screen_and_the_trust_policy(built: Any, real_photos: list[Path],
                                                                 tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A package made with --trusted-keys: its device.toml names the profile and requires a signature, and
    `screen --device-config` (the field path) obeys both: unsigned refused, signed screened."""
    import shutil

    from fundus_edge.bundle.signing import TrustPolicy, generate_keypair, load_signing_key, sign_bundle
    from fundus_edge.devices.config import read_device_table

    keys = generate_keypair(tmp_path / "keys", "clinic")
    pub_only = tmp_path / "pub"
    pub_only.mkdir()
    shutil.copy2(keys.public, pub_only / keys.public.name)
    out = tmp_path / "pkg"
    assert main(["package", "--device", "x86-dev", "--bundle", str(built.out), "--out", str(out),
                 "--trusted-keys", str(pub_only), "--no-tarball", "--json"]) == 0
    pkg = json.loads(capsys.readouterr().out)
    assert any(w.startswith("cryptography-") for w in pkg["wheels"])  # the device can check signatures
    cfg = out / "device.toml"
    assert read_device_table(cfg)["profile"] == "x86-dev"
    policy = TrustPolicy.from_config(cfg)
    assert policy.require_signature and policy.trusted_keys == out / "trusted-keys"
    img = str(real_photos[0])
    assert main(["screen", "--device-config", str(cfg), "--bundle", str(built.out), img]) == 4  # unsigned
    capsys.readouterr()
    signed = tmp_path / "signed"
    shutil.copytree(built.out, signed)
    sign_bundle(signed, load_signing_key(keys.private))
    assert main(["screen", "--device-config", str(cfg), "--bundle", str(signed), img, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["signature"]["verified"] and doc["artifact"] == read_device_table(cfg)["artifact"]
