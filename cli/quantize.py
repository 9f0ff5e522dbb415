"""``fundus-edge quantize``: int8 for an ONNX model you already have, with op coverage and a per-layer table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def cmd_quantize(args: argparse.Namespace) -> int:
    from ..datasets.labels import list_images
    from ..quantization.calibration import prepare_inputs, select_calibration
    from ..quantization.debug import format_table, layer_errors
    from ..quantization.quantize_onnx import OnnxQuantConfig, preprocess_for_quantization, quantize_onnx
    from ..runtime.preprocess import PreprocessSpec

    spec = PreprocessSpec(size=args.size, layout=args.layout)
    files = list_images(args.calib)
    calib = prepare_inputs([files[i] for i in select_calibration(len(files), args.calib_size, 0)], spec).tensors
    import onnx

    input_name = onnx.load(str(args.onnx), load_external_data=False).graph.input[0].name
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pre = preprocess_for_quantization(args.onnx, args.out.with_suffix(".pre.onnx"))
    try:
        cfg = OnnxQuantConfig(calibrator=args.calibrator, per_channel=not args.per_tensor,
                              nodes_to_exclude=tuple(args.exclude_nodes))
        q = quantize_onnx(args.onnx, args.out, calib, input_name, cfg, preprocessed=pre)
        errors = layer_errors(pre, args.out, calib, input_name) if args.debug_layers else []
    finally:
        pre.unlink(missing_ok=True)
    payload: dict[str, Any] = {**q.to_dict(), "out": str(args.out),
                               "layer_errors": [e.to_dict() for e in errors]}
    if args.json:
        print(json.dumps(payload, indent=2))
    else:
        print(f"wrote {args.out}: int8 MAC share {q.int8_mac_fraction:.1%}; quantized ops {q.quantized_ops}; "
              f"float ops {q.float_ops}")
        if errors:
            print("per-layer error, worst SNR first:")
            print(format_table(errors))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("quantize", help="static int8 (QDQ) for an existing ONNX model, with a per-layer debugger")
    p.add_argument("--onnx", type=Path, required=True, help="fp32 ONNX model")
    p.add_argument("--calib", type=Path, required=True, help="folder of fundus images")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--size", type=int, default=224, help="network input size (preprocessing)")
    p.add_argument("--layout", choices=["NCHW", "NHWC"], default="NCHW")
    p.add_argument("--calib-size", type=int, default=128)
    p.add_argument("--calibrator", choices=["minmax", "entropy", "percentile"], default="minmax")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor instead of per-channel weights")
    p.add_argument("--exclude-nodes", nargs="*", default=[])
    p.add_argument("--debug-layers", action="store_true", help="print per-tensor SNR / cosine / max abs error")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_quantize)
