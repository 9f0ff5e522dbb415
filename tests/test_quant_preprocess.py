"""ONNX quantization degrades when onnxruntime's symbolic shape inference gives up, and says which path it took."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fundus_edge.cli.main import main
from fundus_edge.errors import QuantizationError
from fundus_edge.quantization import quantize_onnx as qo

PHOTOS = Path(__file__).parent / "data" / "fundus"


def dynamic_unet(path: Path) -> Path:
    """A one-level U-Net with dynamic H and W: conv -> pool -> upsample -> concat(skip) -> conv. The skip
    concatenates H with 2*floor(H/2), which onnxruntime's symbolic shape inference cannot merge ("Incomplete
    symbolic shape inference"), as on the vessel U-Net; onnxruntime runs it fine for even H, W."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.normal(0, 0.3, (1, 8, 3, 3)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")]
    nodes = [helper.make_node("Conv", ["input", "w1"], ["c"], pads=[1, 1, 1, 1], name="enc"),
             helper.make_node("Relu", ["c"], ["r"], name="enc_relu"),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             helper.make_node("Resize", ["p", "", "scales"], ["u"], mode="nearest", name="up"),
             helper.make_node("Concat", ["r", "u"], ["cat"], axis=1, name="skip"),
             helper.make_node("Conv", ["cat", "w2"], ["logits"], pads=[1, 1, 1, 1], name="head")]
    graph = helper.make_graph(
        nodes, "unet", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 1, "h", "w"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture()
def unet(tmp_path: Path) -> Path:
    return dynamic_unet(tmp_path / "unet.onnx")


def test_symbolic_failure_falls_back_to_onnx_shape_inference(unet: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxruntime.quantization import quant_pre_process

    monkeypatch.chdir(tmp_path)  # quant_pre_process leaves a temp file in the current directory
    with pytest.raises(Exception, match="Incomplete symbolic shape inference"):  # the failure, as seen
        quant_pre_process(str(unet), str(tmp_path / "direct.onnx"), skip_optimization=True)
    pre = qo.preprocess_for_quantization(unet, tmp_path / "pre.onnx")
    path, failed = qo.preprocess_path_of(pre)
    assert path == "onnx-shape-inference"
    assert len(failed) == 1 and failed[0].startswith("symbolic:") and "Incomplete symbolic shape" in failed[0]
    calib = np.random.default_rng(1).random((6, 3, 32, 32), dtype=np.float32)
    q = qo.quantize_onnx(unet, tmp_path / "int8.onnx", calib, "input", preprocessed=pre)
    d = q.to_dict()
    assert d["preprocess"] == "onnx-shape-inference" and "Incomplete" in d["preprocess_failed"][0]
    assert q.quantized_ops.get("Conv") == 2 and q.int8_mac_fraction == 1.0
    # the int8 model keeps the dynamic spatial axes and stays close to fp32
    x = calib[:2]
    ref = ort.InferenceSession(str(unet)).run(None, {"input": x})[0]
    got = ort.InferenceSession(str(tmp_path / "int8.onnx")).run(None, {"input": x})[0]
    assert got.shape == ref.shape == (2, 1, 32, 32)
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.98


def test_symbolic_path_is_recorded_when_it_works(tmp_path: Path) -> None:
    """A plain CNN takes the normal path, and quantize_onnx (without a pre-processed file) says so."""
    rng = np.random.default_rng(2)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w1"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "w2"], ["logits"], name="head")],
        "cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2, 16, 16])],
        [numpy_helper.from_array(rng.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.normal(0, 0.3, (2, 4, 1, 1)).astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "cnn.onnx"))
    calib = rng.random((4, 3, 16, 16), dtype=np.float32)
    q = qo.quantize_onnx(tmp_path / "cnn.onnx", tmp_path / "cnn8.onnx", calib, "input")
    assert q.to_dict()["preprocess"] == "symbolic" and q.preprocess_failed == []
    assert q.quantized_ops.get("Conv") == 2


def test_no_preprocessing_when_quant_pre_process_fails(unet: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("shape inference exploded\nsecond line")

    monkeypatch.setattr(qo._ort_quant(), "quant_pre_process", broken)
    pre = qo.preprocess_for_quantization(unet, tmp_path / "pre.onnx")
    path, failed = qo.preprocess_path_of(pre)
    assert path == "none"
    assert failed == ["symbolic: RuntimeError: shape inference exploded",
                      "onnx-shape-inference: RuntimeError: shape inference exploded"]
    calib = np.random.default_rng(3).random((4, 3, 32, 32), dtype=np.float32)
    q = qo.quantize_onnx(unet, tmp_path / "int8.onnx", calib, "input", preprocessed=pre)
    assert q.preprocess == "none" and q.quantized_ops.get("Conv") == 2


def test_nothing_works_is_a_quantization_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all")
    with pytest.raises(QuantizationError) as exc:
        qo.preprocess_for_quantization(bad, tmp_path / "pre.onnx")
    msg = str(exc.value)
    assert "symbolic:" in msg and "onnx-shape-inference:" in msg and "none:" in msg
    assert "--precisions fp32" in msg and "\n" not in msg


def test_quantize_cli_on_a_model_symbolic_inference_rejects(unet: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q" / "unet.int8.onnx"
    rc = main(["quantize", "--onnx", str(unet), "--calib", str(PHOTOS), "--out", str(out), "--size", "64",
               "--calib-size", "4", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "Traceback" not in captured.err
    payload = json.loads(captured.out)
    assert payload["preprocess"] == "onnx-shape-inference" and payload["quantized_ops"]["Conv"] == 2
    assert out.is_file() and not out.with_suffix(".pre.onnx").exists()


def test_quantize_cli_failure_is_one_line_not_a_traceback(unet: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    def broken(q: object, src: Path, dst: Path, path: str) -> None:
        raise RuntimeError(f"{path} failed")

    monkeypatch.setattr(qo, "_run_pre_process", broken)
    rc = main(["quantize", "--onnx", str(unet), "--calib", str(PHOTOS), "--out", str(tmp_path / "o.onnx"),
               "--size", "64", "--calib-size", "2"])
    err = capsys.readouterr().err
    assert rc == QuantizationError.exit_code == 7
    assert "Traceback" not in err and "cannot prepare unet.onnx for quantization" in err
    assert "symbolic: RuntimeError: symbolic failed" in err and "none: RuntimeError: none failed" in err
