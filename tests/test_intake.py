"""Intake of torch.export (.pt2) files: loading, any batch, ONNX with a dynamic batch, and a whole build."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from fundus_edge.cli.main import main
from fundus_edge.errors import ExportError, ModelLoadError
from fundus_edge.export.load import PT2_META_FILE, ExportedProgramModule, load_model
from fundus_edge.export.onnx import export_onnx
from fundus_edge.export.validate import torch_outputs, validate_export

SIZE = 48


class Tiny(nn.Module):
    def __init__(self, fixed_batch: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, 2, 1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 2)
        self.fixed_batch = fixed_batch
        with torch.no_grad():  # statistics far from (0, 1): training-mode BatchNorm would change the outputs
            self.bn.running_mean.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(1))
            self.bn.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)).relu()
        y = y.mean((2, 3))
        y = y.reshape(1, -1) if self.fixed_batch else y.flatten(1)
        return self.fc(self.drop(y))


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, SIZE, SIZE)).astype(np.float32)


def _save(module: nn.Module, path: Path, batch: int = 1, dynamic: bool = False, **kwargs: object) -> Path:
    example = (torch.zeros(batch, 3, SIZE, SIZE),)
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    torch.export.save(torch.export.export(module, example, dynamic_shapes=shapes), str(path), **kwargs)
    return path


@pytest.mark.parametrize("dynamic", [False, True], ids=["fixed-batch-1", "dynamic-batch"])
def test_pt2_runs_any_batch_and_exports_a_dynamic_batch(tmp_path: Path, dynamic: bool) -> None:
    m = Tiny().eval()
    loaded = load_model(_save(m, tmp_path / "m.pt2", batch=2 if dynamic else 1, dynamic=dynamic))
    module = loaded.module
    assert isinstance(module, ExportedProgramModule) and loaded.program is not None
    assert module.static_batch == (None if dynamic else 1)
    assert module.eval() is module and module.train() is module  # what crashed: "Calling eval() is not supported"
    x = _x(5)
    want = torch_outputs(m, x)
    assert np.allclose(torch_outputs(module, x), want, atol=1e-5)  # 5 images through a batch-1 program
    if dynamic:  # TorchScript cannot trace a program's symbolic batch; the message says which exporter can
        with pytest.raises(ExportError, match=r"SymInts.*--exporter dynamo \(the default\)"):
            export_onnx(module, tmp_path / "legacy.onnx", SIZE, exporter="legacy")
    for exporter in ("dynamo",) if dynamic else ("dynamo", "legacy"):
        out = export_onnx(module, tmp_path / f"m.{exporter}.onnx", SIZE, exporter=exporter)
        sess = ort.InferenceSession(str(out.path))
        assert sess.get_inputs()[0].shape[0] == "batch"
        assert np.allclose(sess.run(None, {"input": x})[0], want, atol=1e-4)
        assert validate_export(module, "onnx", out.path, x, [1])


def test_pt2_with_a_fixed_batch_greater_than_one(tmp_path: Path) -> None:
    m = Tiny().eval()
    module = load_model(_save(m, tmp_path / "m4.pt2", batch=4)).module
    assert isinstance(module, ExportedProgramModule) and module.static_batch == 4
    x = _x(6, seed=1)  # 6 = 4 + 2: the last piece is padded, and the padding dropped
    assert np.allclose(torch_outputs(module, x), torch_outputs(m, x), atol=1e-5)


def test_pt2_exported_in_training_mode_is_refused(tmp_path: Path) -> None:
    path = _save(Tiny().train(), tmp_path / "train.pt2", batch=2)
    with pytest.raises(ModelLoadError, match=r"training mode \(BatchNorm, Dropout.*model\.eval\(\)"):
        load_model(path)


def test_pt2_metadata_and_inputs(tmp_path: Path) -> None:
    meta = {"num_classes": 2, "class_names": ["no-referable", "referable"], "positive_classes": [1],
            "preprocessing": {"size": SIZE}}
    path = _save(Tiny().eval(), tmp_path / "meta.pt2", extra_files={PT2_META_FILE: json.dumps(meta)})
    loaded = load_model(path)
    assert loaded.num_classes == 2 and loaded.meta["class_names"] == ["no-referable", "referable"]

    class TwoInputs(nn.Module):
        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return (x + y).mean((2, 3))

    two = tmp_path / "two.pt2"
    torch.export.save(torch.export.export(TwoInputs(), (torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))), str(two))
    with pytest.raises(ModelLoadError, match=r"takes 2 tensor input\(s\).*one image input"):
        load_model(two)
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"PK not really")
    with pytest.raises(ModelLoadError, match=r"not a loadable torch\.export"):
        load_model(bad)


def test_a_model_that_fixes_its_batch_to_one_exports_and_says_so(tmp_path: Path) -> None:
    """The runtime feeds one image at a time, so a graph with a fixed batch of 1 (the small ViT under the dynamo
    exporter, a model that calls x.view(1, -1)) is usable; the export records it."""
    exp = export_onnx(Tiny(fixed_batch=True).eval(), tmp_path / "fixed.onnx", SIZE)
    assert exp.fixed_batch == 1 and exp.to_dict()["fixed_batch"] == 1


def test_build_from_a_pt2_file(tmp_path: Path, synth_val: Path, synth_calib: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """The shipped reference weights, saved the way a team would hand them over, go through the whole build
    (export, int8, the clinical gate) and come out as a gated bundle."""
    ref = load_model("reference:dr-resnet18s").module
    pt2 = _save_224(ref, tmp_path / "dr.pt2")
    out = tmp_path / "bundle"
    rc = main(["build", "--model", str(pt2), "--calib", str(synth_calib), "--val", str(synth_val), "--out", str(out),
               "--allow-insufficient-evidence",
               "--formats", "onnx", "--no-debug-layers", "--n-boot", "200", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    assert "Traceback" not in captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["source"] == str(pt2) and manifest["model"]["num_outputs"] == 2
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] in ("PASS", "INSUFFICIENT EVIDENCE")  # no harm observed; 300 images show no margin
    gates = {g["artifact"]: g for g in report["gates"]}
    assert gates["onnx-int8"]["verdict"] in ("PASS", "INSUFFICIENT EVIDENCE")
    assert report["quantization"]["onnx-int8"]["preprocess"] == "symbolic"
    assert report["export"]["onnx-fp32"]["passed"] is True


def _save_224(module: nn.Module, path: Path) -> Path:
    torch.export.save(torch.export.export(module.eval(), (torch.zeros(1, 3, 224, 224),)), str(path))
    return path
