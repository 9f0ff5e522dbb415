"""Model files a team brings (fp32 ONNX, a float TFLite), made here for the intake tests, and a runner that builds
from them in a fresh process where ``import torch`` fails loudly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fundus_edge.datasets.synthetic import write_dataset

# Run the CLI with torch (and the other PyTorch-side packages) made unimportable, then report which of them
# were imported anyway (a None entry is the blocker itself).
NO_TORCH = (
    "import json, sys\n"
    "for m in ('torch', 'torchvision', 'onnxscript', 'litert_torch'): sys.modules[m] = None\n"
    "from fundus_edge.cli.main import main\n"
    "try:\n"
    "    rc = main(sys.argv[1:])\n"
    "except SystemExit as e:\n"
    "    rc = e.code\n"
    "loaded = [m for m, v in sys.modules.items() if v is not None and m.split('.')[0] in "
    "('torch', 'torchvision', 'onnxscript', 'litert_torch')]\n"
    "print('IMPORTED=' + json.dumps(loaded), file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def run_without_torch(*args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """``fundus-edge ARGS`` in a fresh interpreter that cannot import torch; (result, torch-side modules loaded)."""
    env = {**os.environ, "ORT_DISABLE_TELEMETRY": "1"}
    r = subprocess.run([sys.executable, "-c", NO_TORCH, *args], capture_output=True, text=True, env=env)
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("IMPORTED=")), "IMPORTED=null")
    return r, json.loads(line.removeprefix("IMPORTED="))


def small_sets(root: Path, n_val: int = 48, n_calib: int = 16) -> tuple[Path, Path]:
    """(validation labels CSV, calibration folder): synthetic, three camera profiles."""
    cams = ("desktop", "handheld", "darkred")
    val = write_dataset(root / "val", n_val, seed=12, cameras=cams)
    calib = write_dataset(root / "calib", n_calib, seed=11, cameras=cams).parent
    return val, calib


def reference_onnx(path: Path) -> Path:
    """The shipped reference classifier (fundus-edge:resnet18s, 224 px, NCHW) as the fp32 ONNX file a team would
    hand over (exported once here, with torch, by the kit's own exporter)."""
    from fundus_edge.export.load import load_model
    from fundus_edge.export.onnx import export_onnx

    export_onnx(load_model("reference:dr-resnet18s").module, path, 224, "NCHW", "legacy")
    return path


def reference_tflite(path: Path) -> Path:
    """The same classifier as a float TFLite file (NHWC input, one 'serving_default' signature)."""
    from fundus_edge.export.load import load_model
    from fundus_edge.export.tflite import export_tflite

    export_tflite(load_model("reference:dr-resnet18s").module, path, 224, model_layout="NCHW", layout="NHWC")
    return path


def tiny_onnx(path: Path, *, layout: str = "NCHW", side: int | str = 32, batch: int | str = "N",
              dense_output: bool = False, int8_weights: bool = False) -> Path:
    """A one-Conv ONNX graph made with onnx.helper (no torch): [N, 2] logits, or a [N, 2, H, W] map."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    shape = [batch, 3, side, side] if layout == "NCHW" else [batch, side, side, 3]
    nodes, inits = [], [numpy_helper.from_array(rng.normal(size=(2, 3, 1, 1)).astype(np.float32), "w")]
    x = "x"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["x"], ["xc"], perm=[0, 3, 1, 2]))
        x = "xc"
    nodes.append(helper.make_node("Conv", [x, "w"], ["map"]))
    out_shape: list[int | str] = [batch, 2, side, side]
    if not dense_output:
        nodes.append(helper.make_node("GlobalAveragePool", ["map"], ["pooled"]))
        nodes.append(helper.make_node("Flatten", ["pooled"], ["y"], axis=1))
        out_shape = [batch, 2]
    if int8_weights:
        inits.append(numpy_helper.from_array(np.arange(6, dtype=np.int8), "w_q"))
    out = "map" if dense_output else "y"
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    onnx.save(model, str(path))
    return path
