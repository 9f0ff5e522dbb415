"""The output contract, checked when a model comes in: the probed output must fit the declared task.

``classification``: logits ``[N, C]`` (``C == 1``: one logit for "referable"). ``segmentation``: logits
``[N, C, H, W]`` at the input's resolution. A model that fits neither fails here with
:class:`~fundus_edge.errors.OutputContractError` (exit code 5, like a model that does not load), naming the
shape it produced and the flags that would declare it, instead of being misread further down (a ``[1, 1, 224,
224]`` vessel map read as 224 classes).

Pure Python: no torch, no numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import OutputContractError, UsageError

TASKS = ("classification", "segmentation")
# Names the kit gives the input and output of the ONNX files it exports (a brought ONNX file keeps its own).
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
LAYOUTS = ("NCHW", "NHWC")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class OutputContract:
    """What the build may rely on: the task and the number of output channels (classes)."""

    task: str
    shape: tuple[int, ...]
    num_outputs: int  # C: classes of a classifier, channels of a segmentation map

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "shape": list(self.shape), "num_outputs": self.num_outputs}


def _dims(shape: Sequence[Any]) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError) as exc:
        raise OutputContractError(f"the model's output shape {tuple(shape)} is not a tuple of sizes", (), "") from exc


def _spatial(input_shape: Sequence[int], layout: str) -> tuple[int, int]:
    if layout not in LAYOUTS:
        raise UsageError(f"input layout must be one of {LAYOUTS}, got {layout!r}")
    if len(input_shape) != 4:
        raise UsageError(f"the probe input must be 4-D (N, C, H, W) or (N, H, W, C), got {tuple(input_shape)}")
    return (int(input_shape[2]), int(input_shape[3])) if layout == "NCHW" else (int(input_shape[1]),
                                                                                  int(input_shape[2]))


def _fail(shape: tuple[int, ...], task: str, what: str, fix: str) -> OutputContractError:
    return OutputContractError(f"the model outputs shape {list(shape)}: {what}. {fix}", shape, task)


def _classification(shape: tuple[int, ...], hw: tuple[int, int]) -> OutputContract:
    task = "classification"
    if len(shape) == 2 and shape[1] >= 1:
        return OutputContract(task, shape, shape[1])
    if len(shape) == 4 and shape[2:] == hw:
        raise _fail(shape, task, f"a per-pixel map at the input's {hw[0]}x{hw[1]} resolution, not class logits",
                    "If it is a segmentation model, declare it with --task segmentation")
    if len(shape) == 4 and shape[1:3] == hw:
        raise _fail(shape, task, "a channels-last per-pixel map, not class logits",
                    "A segmentation model must output [N, C, H, W] (permute its output) and be built with "
                    "--task segmentation")
    if len(shape) == 1:
        raise _fail(shape, task, "one value per image without a class axis",
                    "Classification needs [N, C] logits: keep the class axis (out.unsqueeze(1) for a single "
                    "referable logit; do not squeeze it)")
    if len(shape) == 4 and shape[2:] == (1, 1):
        raise _fail(shape, task, "logits with trailing 1x1 spatial axes",
                    "Flatten them in the model (out.flatten(1)) so that it outputs [N, C]")
    raise _fail(shape, task, "not classification logits [N, C]",
                "Declare a segmentation model (output [N, C, H, W] at the input's resolution) with "
                "--task segmentation; a classifier must output [N, C]")


def _segmentation(shape: tuple[int, ...], hw: tuple[int, int]) -> OutputContract:
    task = "segmentation"
    if len(shape) == 4 and shape[2:] == hw and shape[1] >= 1:
        return OutputContract(task, shape, shape[1])
    if len(shape) == 2:
        raise _fail(shape, task, "class logits [N, C], not a per-pixel map",
                    "It is a classifier: build it with --task classification (the default)")
    if len(shape) == 4 and shape[1:3] == hw:
        raise _fail(shape, task, "a channels-last map [N, H, W, C]",
                    "The kit needs [N, C, H, W]: permute the output in the model (out.permute(0, 3, 1, 2))")
    if len(shape) == 3 and shape[1:] == hw:
        raise _fail(shape, task, "a map without a channel axis",
                    "The kit needs [N, C, H, W] logits: keep the channel axis (out.unsqueeze(1))")
    if len(shape) == 4:
        raise _fail(shape, task, f"a map of {shape[2]}x{shape[3]} for a {hw[0]}x{hw[1]} input",
                    "The kit needs logits at the input's resolution: upsample inside the model "
                    "(F.interpolate(..., size=x.shape[-2:]))")
    raise _fail(shape, task, "not a segmentation map [N, C, H, W]",
                "A segmentation model must output [N, C, H, W] logits at the input's resolution")


def check_output(shape: Sequence[Any], task: str, input_shape: Sequence[int], layout: str = "NCHW",
                 dtype: Any = "float32") -> OutputContract:
    """Check a probed output against ``task``; returns the contract or raises :class:`OutputContractError`.

    ``shape``/``dtype``: the output of one forward pass on a probe of ``input_shape`` (``layout`` says where
    H and W are). The output's batch must equal the probe's.
    """
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}; choose one of {TASKS}")
    dims = _dims(shape)
    hw = _spatial(input_shape, layout)
    name = str(getattr(dtype, "name", dtype)).removeprefix("torch.")
    if name not in FLOAT_DTYPES:
        raise OutputContractError(
            f"the model outputs {name} values of shape {list(dims)}: fundus-edge needs float logits (the gate "
            "thresholds scores); export the model before its argmax/threshold", dims, task)
    if not dims or dims[0] != int(input_shape[0]):
        raise _fail(dims, task, f"its first axis is not the batch ({int(input_shape[0])} images went in)",
                    "The output must keep the batch axis first")
    if task == "classification":
        return _classification(dims, hw)
    return _segmentation(dims, hw)
