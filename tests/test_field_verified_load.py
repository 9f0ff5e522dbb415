"""What is verified is what runs: the model's bytes are read once, hashed, and handed to the backend; bundle
metadata files must be regular files inside the bundle; ONNX external data is refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fundus_edge.bundle.read import MANIFEST, Bundle, load_bundle
from fundus_edge.bundle.signing import SIGNATURE_FILE, TrustPolicy, generate_keypair, load_signing_key, sign_bundle
from fundus_edge.bundle.signing import load_trusted as load_trusted_bundle
from fundus_edge.errors import BundleIntegrityError
from fundus_edge.runtime import screen as screen_mod
from fundus_edge.runtime.backends.onnx_scan import has_external_data


@pytest.fixture()
def signed(bundle_copy: Path, tmp_path: Path) -> tuple[Path, TrustPolicy]:
    keys = generate_keypair(tmp_path / "keys", "clinic")
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    (trusted / keys.public.name).write_bytes(keys.public.read_bytes())
    sign_bundle(bundle_copy, load_signing_key(keys.private))
    return bundle_copy, TrustPolicy(trusted_keys=trusted, require_signature=True)


def _attacker_model(bundle: Bundle, path: Path) -> None:
    """Another model with the same I/O that always says 'refer' with certainty."""
    import onnx
    from onnx import TensorProto, helper

    real_input = onnx.load(str(bundle.path(bundle.artifact(fmt="onnx")))).graph.input[0]
    n = len(bundle.class_names)
    logits = np.full((1, n), -20.0, np.float32)
    logits[0, bundle.positive_classes] = 20.0
    const = helper.make_tensor("c", TensorProto.FLOAT, [1, n], logits.ravel().tolist())
    nodes = [helper.make_node("ReduceMean", [bundle.input_name], ["m"], keepdims=0),
             helper.make_node("Constant", [], ["k"], value=const),
             helper.make_node("Add", ["k", "zero"], ["logits"])]
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    graph = helper.make_graph(nodes, "attacker",
                              [real_input],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, n])], [zero])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def _decisions(screener: Any, photos: list[Path]) -> list[tuple[str | None, float | None]]:
    with screener:
        return [(r.decision, r.probability) for r in map(screener.screen, photos)]


def test_model_swapped_after_verification_is_refused_or_runs_the_verified_bytes(
        signed: tuple[Path, TrustPolicy], real_photos: list[Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    root, policy = signed
    photos = real_photos[:3]
    baseline, status = load_trusted_bundle(root, policy, fmt="onnx")
    assert status.verified
    expected = _decisions(baseline, photos)
    art = load_bundle(root).artifact(fmt="onnx")
    model = root / art.path
    original = model.read_bytes()
    evil = tmp_path / "evil.onnx"
    _attacker_model(load_bundle(root), evil)
    # the attacker's model really would change the decisions if it were run
    attacked = screen_mod.load(load_bundle(root, verify=False), fmt="onnx")
    attacked.backend.deactivate()
    attacked.backend.model_bytes = evil.read_bytes()
    attacked.backend.activate()
    assert _decisions(attacked, photos) != expected

    # 1. swapped after the checksums were verified, before the backend reads the model: the bytes read do not
    #    match the manifest any more -> refused
    real_read = Bundle.read_artifact

    def swap_then_read(self: Bundle, a: Any) -> bytes:
        os.replace(evil, model) if evil.exists() else model.write_bytes(evil.read_bytes())
        return real_read(self, a)

    monkeypatch.setattr(Bundle, "read_artifact", swap_then_read)
    with pytest.raises(BundleIntegrityError, match="sha256"):
        load_trusted_bundle(root, policy, fmt="onnx")
    monkeypatch.undo()
    model.write_bytes(original)
    _attacker_model(load_bundle(root), evil)

    # 2. swapped after the verified bytes were read, before the engine is created: the engine runs the verified
    #    bytes, never the file now at the path
    real_create = screen_mod.create_backend

    def swap_then_create(*args: Any, **kwargs: Any) -> Any:
        os.replace(evil, model)
        return real_create(*args, **kwargs)

    monkeypatch.setattr(screen_mod, "create_backend", swap_then_create)
    screener, _ = load_trusted_bundle(root, policy, fmt="onnx")
    assert model.read_bytes() != original  # the swap did happen
    assert _decisions(screener, photos) == expected


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink-out"])
@pytest.mark.parametrize("name", [MANIFEST, SIGNATURE_FILE])
def test_manifest_and_signature_must_be_regular_files(signed: tuple[Path, TrustPolicy], tmp_path: Path,
                                                      real_photos: list[Path], kind: str, name: str) -> None:
    root, policy = signed
    target = root / name
    outside = tmp_path / ("outside-" + name)
    outside.write_bytes(target.read_bytes())  # the same bytes: only where they live is wrong
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    else:
        target.symlink_to(outside)
    cmd = [sys.executable, "-m", "fundus_edge", "screen", "--bundle", str(root), "--trusted-keys",
           str(policy.trusted_keys), "--require-signature", str(real_photos[0])]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)  # a hang fails here
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr
    assert name in proc.stderr


def test_onnx_external_data_is_refused(bundle_copy: Path, tmp_path: Path) -> None:
    import onnx

    bundle = load_bundle(bundle_copy)
    art = bundle.artifact(fmt="onnx")
    model = onnx.load(str(bundle.path(art)))
    assert not has_external_data(bundle.path(art).read_bytes())
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(model, str(ext / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    data = (ext / "m.onnx").read_bytes()
    assert has_external_data(data)
    from fundus_edge.runtime.backends import create_backend

    cwd = os.getcwd()
    os.chdir(ext)  # where onnxruntime would find m.data if it were allowed to look
    try:
        with pytest.raises(BundleIntegrityError, match="external data"):
            create_backend("onnx", "m.onnx", model_bytes=data).activate()
    finally:
        os.chdir(cwd)
