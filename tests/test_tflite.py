"""The TFLite path: litert-torch export (NCHW / NHWC), full-integer int8, the LiteRT backend and its imports."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fundus_edge.errors import MissingDependencyError, UsageError
from fundus_edge.export.tflite import export_tflite
from fundus_edge.export.validate import torch_outputs
from fundus_edge.quantization.quantize_tflite import TfliteQuantConfig, quantize_tflite
from fundus_edge.runtime.backends import BackendSettings, create_backend, run_backend
from fundus_edge.runtime.backends.litert import INTERPRETER_MODULES, TensorQuant, import_interpreter
from fundus_edge.runtime.preprocess import relayout
from fundus_edge.runtime.tflite_graph import inspect_tflite

SIZE = 32


class SmallNet(nn.Module):
    """Conv-BN-ReLU, a residual add, pooling and a linear head: the op mix of the reference ResNet."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, 1, 1)
        self.fc = nn.Linear(8, 3)
        with torch.no_grad():  # BatchNorm statistics far from (0, 1): training-mode BN would change outputs
            self.bn.running_mean.uniform_(-1.0, 1.0, generator=torch.Generator().manual_seed(1))
            self.bn.running_var.uniform_(0.5, 2.0, generator=torch.Generator().manual_seed(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x)).relu()
        y = (y + self.conv2(y)).relu()
        return self.fc(y.mean((2, 3)))


def _images(n: int, seed: int) -> np.ndarray:
    """Smooth random NCHW 'images' in the normalised range of the preprocessing."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(0.0, 1.0, (n, 3, SIZE // 4, SIZE // 4)).astype(np.float32)
    return np.ascontiguousarray(coarse.repeat(4, axis=2).repeat(4, axis=3))


@pytest.fixture(scope="module")
def small() -> nn.Module:
    torch.manual_seed(0)
    return SmallNet().eval()


@pytest.fixture(scope="module")
def exported(small: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tflite")
    return {layout: export_tflite(small, d / f"small.{layout}.tflite", SIZE, "NCHW", layout).path
            for layout in ("NCHW", "NHWC")}


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_export_layouts_match_pytorch(small: nn.Module, exported: dict[str, Path], layout: str) -> None:
    x = _images(6, seed=3)
    ref = torch_outputs(small, x)
    got, backend = run_backend("tflite", exported[layout], relayout(x, "NCHW", layout))
    assert backend.name == "litert"
    want_shape = (1, 3, SIZE, SIZE) if layout == "NCHW" else (1, SIZE, SIZE, 3)
    assert backend.input_shape == want_shape  # type: ignore[attr-defined]
    assert np.abs(got - ref).max() < 1e-4
    assert np.array_equal(got.argmax(1), ref.argmax(1))


def test_wrong_layout_is_refused_with_a_hint(exported: dict[str, Path]) -> None:
    x = _images(1, seed=4)  # NCHW
    with create_backend("tflite", exported["NHWC"]) as backend, pytest.raises(UsageError, match="NHWC"):
        backend.infer(x)


def test_channel_last_wrapper_is_converted_in_eval_mode(small: nn.Module, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """litert_torch.to_channel_last_io returns a module in training mode; export_tflite must hand an eval-mode
    module (every submodule) to the converter."""
    import litert_torch

    assert litert_torch.to_channel_last_io(small, args=[0]).training  # what the library does
    seen: list[tuple[str, bool]] = []
    real_convert = litert_torch.convert

    def spy(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        seen.extend((name, m.training) for name, m in module.named_modules())
        return real_convert(module, *args, **kwargs)

    monkeypatch.setattr(litert_torch, "convert", spy)
    export_tflite(small, tmp_path / "m.tflite", SIZE, "NCHW", "NHWC")
    assert "wrapped" in dict(seen)  # the channels-last wrapper is what was converted
    assert [name for name, training in seen if training] == []


@pytest.fixture(scope="module")
def quantized(exported: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("int8")
    calib = relayout(_images(24, seed=6), "NCHW", "NHWC")
    calib[-1] *= 1.8  # the widest-ranging image comes last: a moving average would not reach its extremes
    fp32 = exported["NHWC"]
    out = {"calib": calib}
    for name, cfg in {"int8-io": TfliteQuantConfig(threads=2),
                      "float-io": TfliteQuantConfig(io_dtype="float32", threads=2),
                      "moving-average": TfliteQuantConfig(calibration="moving-average", threads=2),
                      "fc-float": TfliteQuantConfig(float_ops=("FULLY_CONNECTED",), threads=2)}.items():
        out[name] = quantize_tflite(fp32, d / f"{name}.tflite", calib, cfg)
    return out


def test_full_integer_int8_with_int8_and_float_io(quantized: dict[str, Any], small: nn.Module) -> None:
    int8_io, float_io = quantized["int8-io"], quantized["float-io"]
    for q, io in ((int8_io, "int8"), (float_io, "float32")):
        cov = q.coverage
        assert cov.full_integer, cov.summary()
        assert cov.float_ops == {} and cov.inner_conversions == 0 and cov.int8_mac_fraction == 1.0
        assert (cov.input_dtype, cov.output_dtype) == (io, io)
        assert cov.integer_ops.get("CONV_2D") == 2 and cov.integer_ops.get("FULLY_CONNECTED") == 1
    assert int8_io.coverage.io_conversions == 0 and float_io.coverage.io_conversions == 2
    summary = int8_io.to_dict()
    assert summary["full_integer"] and summary["io_dtype"] == {"input": "int8", "output": "int8"}


def test_int8_io_scaling_matches_the_float_io_model(quantized: dict[str, Any], small: nn.Module) -> None:
    """The backend's (de)quantization of int8 I/O does what the float-I/O model's own QUANTIZE/DEQUANTIZE do."""
    x = relayout(_images(12, seed=7), "NCHW", "NHWC")
    with create_backend("tflite", quantized["int8-io"].path) as b8:
        out8 = np.concatenate([b8.infer(x[i : i + 1]) for i in range(len(x))])
        out_q: TensorQuant = b8.output_quant  # type: ignore[attr-defined]
        assert b8.input_quant.quantized and out_q.quantized  # type: ignore[attr-defined]
    outf, _ = run_backend("tflite", quantized["float-io"].path, x)
    assert np.abs(out8 - outf).max() <= out_q.scale * 1.01  # at most one output quantum apart
    ref = torch_outputs(small, relayout(x, "NHWC", "NCHW"))
    assert np.abs(out8 - ref).max() < 0.1 * np.abs(ref).max()  # and near PyTorch


def test_global_min_max_calibration_keeps_the_extremes(quantized: dict[str, Any]) -> None:
    calib = quantized["calib"]
    lo, hi = quantized["int8-io"].input_range
    assert (lo, hi) == pytest.approx((float(calib.min()), float(calib.max())), abs=1e-6)
    ma_lo, ma_hi = quantized["moving-average"].input_range
    assert ma_hi < hi - 0.1 or ma_lo > lo + 0.1  # the library default forgets the last image's range


def test_float_fallback_shows_in_the_coverage(quantized: dict[str, Any]) -> None:
    cov = quantized["fc-float"].coverage
    assert not cov.full_integer and not cov
    assert cov.float_ops == {"FULLY_CONNECTED": 1} and cov.inner_conversions >= 1
    assert "NOT full-integer" in cov.summary() and "FULLY_CONNECTED" in cov.summary()
    assert not inspect_tflite(quantized["fc-float"].path).full_integer


def test_tensor_quant_arithmetic() -> None:
    q = TensorQuant(np.dtype(np.int8), 0.5, -3)
    x = np.array([-100.0, -1.26, 0.0, 0.25, 0.76, 100.0], np.float32)
    got = q.quantize(x)
    assert got.dtype == np.int8
    assert got.tolist() == [-128, -6, -3, -3, -1, 127]  # saturating; round half to even (0.5 -> 0)
    assert q.dequantize(got).tolist() == [-62.5, -1.5, 0.0, 0.0, 1.0, 65.0]
    u = TensorQuant(np.dtype(np.uint8), 0.1, 128)
    assert u.quantize(np.array([-20.0, 0.0, 1.0], np.float32)).tolist() == [0, 128, 138]
    f = TensorQuant(np.dtype(np.float32), 0.0, 0)
    assert not f.quantized and f.quantize(x) is x
    with pytest.raises(UsageError, match="per channel"):
        TensorQuant.from_details({"name": "t", "dtype": np.int8, "quantization": (0.1, 0),
                                  "quantization_parameters": {"scales": np.array([0.1, 0.2])}})
    with pytest.raises(UsageError, match="without quantization"):
        TensorQuant.from_details({"name": "t", "dtype": np.int8, "quantization": (0.0, 0)})


# --------------------------------------------------------------------------------------- import fallback
def _fake(name: str, interpreter: Any) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.Interpreter = interpreter  # type: ignore[attr-defined]
    return mod


def test_interpreter_import_order(monkeypatch: pytest.MonkeyPatch) -> None:
    assert [m for m, _ in INTERPRETER_MODULES] == ["ai_edge_litert.interpreter", "tflite_runtime.interpreter",
                                                   "tensorflow.lite"]
    classes = {m: type(f"Interp_{i}", (), {}) for i, (m, _) in enumerate(INTERPRETER_MODULES)}
    for m, cls in classes.items():
        monkeypatch.setitem(sys.modules, m, _fake(m, cls))
    order = []
    for m, _ in INTERPRETER_MODULES:
        api = import_interpreter()
        order.append(api.module)
        assert api.interpreter is classes[api.module]
        monkeypatch.setitem(sys.modules, m, None)  # None in sys.modules: that import now fails
    assert order == [m for m, _ in INTERPRETER_MODULES]
    with pytest.raises(MissingDependencyError) as info:
        import_interpreter()
    msg = str(info.value)
    assert info.value.exit_code == 3
    assert "pip install 'fundus-edge[litert]'" in msg and "ai-edge-litert" in msg and "tflite-runtime" in msg
    assert all(m in msg for m, _ in INTERPRETER_MODULES)  # every module tried is named


def test_backend_runs_through_the_tflite_runtime_fallback(monkeypatch: pytest.MonkeyPatch,
                                                          exported: dict[str, Path], small: nn.Module) -> None:
    """Without ai_edge_litert the backend uses tflite_runtime's Interpreter (here: the same class, relabelled)."""
    from ai_edge_litert import interpreter as real

    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    fallback = _fake("tflite_runtime.interpreter", real.Interpreter)
    fallback.OpResolverType = real.OpResolverType  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", fallback)
    x = _images(2, seed=8)
    with create_backend("tflite", exported["NCHW"], BackendSettings(threads=1)) as backend:
        out = backend.infer(x)
        assert backend.api.module == "tflite_runtime.interpreter"  # type: ignore[attr-defined]
    assert np.abs(out - torch_outputs(small, x)).max() < 1e-4


def test_no_tflite_runtime_fails_naming_the_package(monkeypatch: pytest.MonkeyPatch, built: Any,
                                                    real_photos: list[Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from fundus_edge.cli import main

    for m, _ in INTERPRETER_MODULES:
        monkeypatch.setitem(sys.modules, m, None)
    code = main(["screen", "--bundle", str(built.out), "--backend", "litert", str(real_photos[0])])
    err = capsys.readouterr().err
    assert code == 3
    assert "pip install 'fundus-edge[litert]'" in err and "tflite-runtime" in err
