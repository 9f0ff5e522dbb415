from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fundus_edge.errors import ExportError, ModelLoadError, UsageError
from fundus_edge.export.load import build_architecture, load_model
from fundus_edge.export.onnx import export_onnx
from fundus_edge.export.validate import torch_outputs, validate_export
from fundus_edge.models.reference import ResNet18S
from fundus_edge.runtime.backends import run_backend
from fundus_edge.runtime.compare import Tolerance


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).relu().mean((2, 3)))


X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_module_passthrough() -> None:
    m = Tiny().train()
    loaded = load_model(m)
    assert loaded.module is m and not m.training


def test_state_dict_with_torchvision_arch(tmp_path: Path) -> None:
    ref = build_architecture("torchvision:mobilenet_v3_small", 5)
    p = tmp_path / "mnv3.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, p)
    loaded = load_model(p, arch="torchvision:mobilenet_v3_small", num_classes=5)
    ref.eval()
    with torch.no_grad():
        assert torch.allclose(loaded.module(X), ref(X))


def test_mismatched_checkpoint_lists_keys(tmp_path: Path) -> None:
    p = tmp_path / "r18s.pt"
    torch.save(ResNet18S(num_classes=2, width=16).state_dict(), p)
    with pytest.raises(ModelLoadError) as exc:
        load_model(p, arch="fundus-edge:resnet18s", num_classes=5)
    msg = str(exc.value)
    assert "shape mismatches" in msg and "fc.weight" in msg and "--num-classes" in msg
    with pytest.raises(ModelLoadError) as exc2:
        load_model(p, arch="torchvision:mobilenet_v3_small", num_classes=2)
    assert "missing keys" in str(exc2.value) and "unexpected keys" in str(exc2.value)
    # resnet18s mirrors torchvision's parameter names, so only the widths disagree there
    with pytest.raises(ModelLoadError, match=r"bn1.weight: checkpoint \(16,\) vs model \(64,\)"):
        load_model(p, arch="torchvision:resnet18", num_classes=2)


def test_state_dict_needs_arch(tmp_path: Path) -> None:
    p = tmp_path / "sd.pt"
    torch.save(Tiny().state_dict(), p)
    with pytest.raises(UsageError, match="--arch"):
        load_model(p)
    with pytest.raises(UsageError, match="did you mean"):
        build_architecture("torchvision:resnet1", 2)
    with pytest.raises(UsageError, match="namespace"):
        build_architecture("resnet18", 2)


def test_torchscript_and_exported_program(tmp_path: Path) -> None:
    m = Tiny().eval()
    ts = tmp_path / "m.ts.pt"
    torch.jit.trace(m, X).save(str(ts))
    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(m, (X,)), str(pt2))
    with torch.no_grad():
        want = m(X)
        assert torch.allclose(load_model(ts).module(X), want, atol=1e-6)
        assert torch.allclose(load_model(pt2).module(X), want, atol=1e-6)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "none.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_model(junk)
    with pytest.raises(UsageError, match="no shipped reference"):
        load_model("reference:nope")


def test_reference_checkpoint_carries_its_metadata() -> None:
    loaded = load_model("reference:dr-resnet18s")
    assert loaded.arch == "fundus-edge:resnet18s" and loaded.num_classes == 2
    assert loaded.meta["training"]["val_auc"] >= 0.9
    assert loaded.meta["preprocessing"]["size"] == 224


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_onnx_export_parity_and_dynamic_batch(tmp_path: Path, exporter: str) -> None:
    m = ResNet18S(2, 16).eval()
    out = export_onnx(m, tmp_path / "m.onnx", 96, exporter=exporter)
    assert out.opset >= 17 and out.exporter == exporter
    x = np.random.default_rng(0).normal(size=(3, 3, 96, 96)).astype(np.float32)
    result = validate_export(m, "onnx", out.path, x, [1], name=f"onnx-{exporter}")
    assert result and result.max_abs < 1e-4 and result.top1_agreement == 1.0
    import onnxruntime as ort

    sess = ort.InferenceSession(str(out.path))
    assert sess.run(None, {"input": x})[0].shape == (3, 2)  # dynamic batch


def test_validation_fails_on_a_different_model(tmp_path: Path) -> None:
    m = ResNet18S(2, 16).eval()
    out = export_onnx(m, tmp_path / "m.onnx", 64, exporter="legacy")
    other = ResNet18S(2, 16).eval()
    x = np.random.default_rng(1).normal(size=(4, 3, 64, 64)).astype(np.float32)
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        validate_export(other, "onnx", out.path, x, [1], Tolerance(atol=1e-4))
    got, _ = run_backend("onnx", out.path, x)
    assert np.allclose(got, torch_outputs(m, x), atol=1e-4)
