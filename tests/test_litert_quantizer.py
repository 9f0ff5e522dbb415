"""The LiteRT quantizer: litert-quantizer preferred, ai-edge-quantizer as the fallback, global min/max calibration
re-verified on whichever package runs; the fp32 .tflite comes from a torch.export (.pt2) file."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fundus_edge.errors import RuntimeMissingError
from fundus_edge.export.load import ExportedProgramModule, load_model
from fundus_edge.export.tflite import export_tflite
from fundus_edge.export.validate import torch_outputs
from fundus_edge.quantization.fallback_tflite import tflite_ops
from fundus_edge.quantization.quantize_tflite import (
    TfliteQuantConfig,
    calibrate_tflite,
    import_quantizer,
    quantize_calibrated,
)
from fundus_edge.runtime.backends import run_backend
from fundus_edge.runtime.preprocess import relayout

SIZE = 32
PACKAGES = {"litert-quantizer": "litert_quantizer", "ai-edge-quantizer": "ai_edge_quantizer"}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1)
        self.conv2 = nn.Conv2d(8, 8, 3, 1, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).relu()
        return self.fc((y + self.conv2(y)).relu().mean((2, 3)))


def _images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0.0, 1.0, (n, 3, SIZE // 4, SIZE // 4)).astype(np.float32)
    return np.ascontiguousarray(coarse.repeat(4, axis=2).repeat(4, axis=3))


def _use(monkeypatch: pytest.MonkeyPatch, dist: str) -> None:
    """Make only ``dist`` importable, as on a machine that has only that package."""
    for other, module in PACKAGES.items():
        if other != dist:
            monkeypatch.setitem(sys.modules, module, None)


@pytest.fixture(scope="module")
def fp32(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A .pt2 (fixed batch 1, as torch.export is usually called) -> load_model -> litert-torch -> fp32 .tflite."""
    d = tmp_path_factory.mktemp("lq")
    torch.manual_seed(0)
    net = Net().eval()
    pt2 = d / "net.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(1, 3, SIZE, SIZE),)), str(pt2))
    loaded = load_model(pt2)
    assert isinstance(loaded.module, ExportedProgramModule) and loaded.module.static_batch == 1
    path = export_tflite(loaded.module, d / "net.tflite", SIZE, "NCHW", "NHWC").path
    return {"net": net, "path": path}


def test_the_pt2_converts_to_tflite(fp32: dict[str, Any]) -> None:
    x = _images(4, seed=1)
    ref = torch_outputs(fp32["net"], x)
    got, _ = run_backend("tflite", fp32["path"], relayout(x, "NCHW", "NHWC"))
    assert np.abs(got - ref).max() < 1e-4


def test_import_prefers_litert_quantizer(monkeypatch: pytest.MonkeyPatch) -> None:
    installed = [d for d, m in PACKAGES.items() if importlib.util.find_spec(m) is not None]
    assert installed, "the export extra installs a LiteRT quantizer"
    assert import_quantizer().dist == installed[0]  # litert-quantizer whenever it is there
    _use(monkeypatch, "ai-edge-quantizer")
    if "ai-edge-quantizer" in installed:
        pkg = import_quantizer()
        assert pkg.dist == "ai-edge-quantizer" and pkg.module.__name__ == "ai_edge_quantizer"
        assert pkg.sub("utils.qsv_utils").__name__ == "ai_edge_quantizer.utils.qsv_utils"


def test_neither_package_is_a_missing_dependency(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in PACKAGES.values():
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(RuntimeMissingError) as exc:
        import_quantizer()
    assert exc.value.exit_code == 3
    assert "litert_quantizer" in str(exc.value) and "ai_edge_quantizer" in str(exc.value)
    assert "pip install 'fundus-edge[export]'" in str(exc.value)


def _true_extremes(path: Path, calib: np.ndarray) -> dict[str, tuple[float, float]]:
    """Every activation tensor's min and max over the whole calibration set, from the fp32 interpreter."""
    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():  # "preserve_all_tensors is for debugging": this is what it is for
        warnings.simplefilter("ignore")
        interp = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for i in range(len(calib)):
        interp.set_tensor(inp, calib[i : i + 1])
        interp.invoke()
        for t in interp.get_tensor_details():
            try:
                v = interp.get_tensor(t["index"])
            except ValueError:
                continue
            if v.dtype != np.float32 or not v.size:
                continue
            lo[t["name"]] = min(lo.get(t["name"], np.inf), float(v.min()))
            hi[t["name"]] = max(hi.get(t["name"], -np.inf), float(v.max()))
    return {k: (lo[k], hi[k]) for k in lo}


@pytest.mark.parametrize("dist", list(PACKAGES))
def test_global_min_max_is_the_true_activation_range(fp32: dict[str, Any], dist: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    if importlib.util.find_spec(PACKAGES[dist]) is None:
        pytest.fail(f"{dist} is not installed: both quantizer packages are in the export environment")
    _use(monkeypatch, dist)
    calib = relayout(_images(12, seed=6), "NCHW", "NHWC")
    calib[-1] *= 1.8  # the widest-ranging image comes last: a moving average would not reach its extremes
    true = _true_extremes(fp32["path"], calib)
    cal = calibrate_tflite(fp32["path"], calib, TfliteQuantConfig(threads=2))
    assert cal.package is not None and cal.package.dist == dist
    activations = {name: q for name, q in cal.qsvs.items() if name in true and "min" in q}
    assert len(activations) >= 5  # input, convs, add, mean, logits
    for name, q in activations.items():
        assert (float(np.min(q["min"])), float(np.max(q["max"]))) == pytest.approx(true[name], abs=1e-5), name
    ma = calibrate_tflite(fp32["path"], calib, TfliteQuantConfig(calibration="moving-average", threads=2))
    clipped = [n for n, q in ma.qsvs.items()
               if n in true and "max" in q and float(np.max(q["max"])) < true[n][1] - 1e-3]
    assert clipped, "the library default (moving average) should forget the last image's extremes"
    result = quantize_calibrated(cal, tmp_path / "int8.tflite", TfliteQuantConfig(threads=2))
    summary = result.to_dict()
    assert summary["quantizer"] == f"{dist} {cal.package.version}" and summary["tool"].startswith(dist)
    assert summary["versions"][dist] == cal.package.version and summary["full_integer"]
    ops = [op for _, op in tflite_ops(fp32["path"])]  # the TFLite fallback's op list, through the same package
    assert ops.count("CONV_2D") == 2 and ops.count("FULLY_CONNECTED") == 1
