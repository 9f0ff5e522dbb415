"""Per-layer quantization debugger: fp32 vs int8 activations tensor by tensor (after ORT's qdq_loss_debug).

For every activation tensor that the QDQ model quantizes, it reports the signal-to-quantization-noise ratio
(dB), the cosine similarity and the max abs difference against the float model on a few images. The first
tensors with a low SNR are where int8 hurts.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MissingDependencyError
from .calibration import ArrayCalibrationReader


@dataclass(frozen=True)
class LayerError:
    tensor: str
    op_type: str
    snr_db: float
    cosine: float
    max_abs: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _snr_db(f: np.ndarray, q: np.ndarray) -> float:
    noise = float(np.sum((f - q) ** 2))
    signal = float(np.sum(f**2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


def _cosine(f: np.ndarray, q: np.ndarray) -> float:
    nf, nq = float(np.linalg.norm(f)), float(np.linalg.norm(q))
    if nf == 0.0 or nq == 0.0:
        return 1.0 if nf == nq else 0.0
    return float(np.dot(f.ravel(), q.ravel()) / (nf * nq))


def layer_errors(float_model: Path, qdq_model: Path, inputs: np.ndarray, input_name: str,
                 max_images: int = 8) -> list[LayerError]:
    """Per-tensor errors in graph order. ``float_model`` must be the (pre-processed) model that was quantized."""
    try:
        import onnx
        from onnxruntime.quantization import qdq_loss_debug as dbg
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", "export", "The per-layer quantization debugger") from exc
    data = inputs[:max_images]
    with tempfile.TemporaryDirectory(prefix="fe-dbg-") as tmp:
        aug_f = Path(tmp) / "float_aug.onnx"
        aug_q = Path(tmp) / "qdq_aug.onnx"
        dbg.modify_model_output_intermediate_tensors(str(float_model), str(aug_f))
        dbg.modify_model_output_intermediate_tensors(str(qdq_model), str(aug_q))
        f_acts = dbg.collect_activations(str(aug_f), ArrayCalibrationReader(data, input_name))
        q_acts = dbg.collect_activations(str(aug_q), ArrayCalibrationReader(data, input_name))
    matched = dbg.create_activation_matching(q_acts, f_acts)
    graph = onnx.load(str(float_model)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    order = {o: i for i, n in enumerate(graph.node) for o in n.output}
    out: list[LayerError] = []
    for name, m in matched.items():
        if "float" not in m or "post_qdq" not in m:
            continue
        f = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in m["float"]])
        q = np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in m["post_qdq"]])
        if f.shape != q.shape:
            continue
        out.append(LayerError(name, producer.get(name, "input"), _snr_db(f, q), _cosine(f, q),
                              float(np.max(np.abs(f - q))) if f.size else 0.0))
    out.sort(key=lambda e: order.get(e.tensor, -1))
    return out


def format_table(errors: list[LayerError], worst: int = 15) -> str:
    lines = [f"{'tensor':<40} {'op':<12} {'SNR dB':>8} {'cosine':>8} {'max|d|':>9}"]
    for e in sorted(errors, key=lambda e: e.snr_db)[:worst]:
        lines.append(f"{e.tensor[:40]:<40} {e.op_type:<12} {e.snr_db:8.2f} {e.cosine:8.5f} {e.max_abs:9.4f}")
    return "\n".join(lines)
