"""Which task a build is (``--task classification|segmentation|auto``): the model's output is probed and checked
against the output contract (export/contract.py). ``auto``: the checkpoint's ``task`` when it records one, else
the task whose contract the probed output fits; a model that fits none is refused (OutputContractError, exit 5)."""

from __future__ import annotations

from typing import Any

from ..errors import OutputContractError, UsageError
from ..export.contract import TASKS, OutputContract, check_output

TASK_CHOICES = (*TASKS, "auto")
PROBE_SIDE = 64  # segmentation probe: a small square, a multiple of any U-Net's stride up to 2**6


def probe(module: Any, shape: tuple[int, ...]) -> tuple[tuple[int, ...], str] | None:
    """The output shape and dtype of one forward pass on zeros of ``shape``; None when the model refuses it."""
    import torch

    try:
        with torch.no_grad():
            out = module(torch.zeros(shape, dtype=torch.float32))
    except Exception:
        return None
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    return (tuple(out.shape), str(out.dtype)) if hasattr(out, "shape") else None


def _probe_shapes(task: str, meta: dict[str, Any], size: int, layout: str) -> list[tuple[int, ...]]:
    """Inputs to probe, most likely first: the checkpoint's own input for its task, then 3 and 1 channels."""
    if task == "segmentation":
        dense = meta.get("dense_preprocessing") or {}
        first = 3 if dense.get("color") == "rgb" else 1 if dense else 3
        side = int(dense.get("tile") or PROBE_SIDE) if dense else PROBE_SIDE
        return [(1, c, side, side) for c in dict.fromkeys((first, 3, 1))]
    return [(1, 3, size, size) if layout == "NCHW" else (1, size, size, 3)]


def contract_for(module: Any, task: str, meta: dict[str, Any], size: int, layout: str = "NCHW"
                 ) -> tuple[OutputContract, tuple[int, ...]]:
    """Probe the model for ``task`` and check its output; returns the contract and the probe's input shape."""
    shapes = _probe_shapes(task, meta, size, layout)
    for shape in shapes:
        got = probe(module, shape)
        if got is not None:
            return check_output(got[0], task, shape, layout if task == "classification" else "NCHW", got[1]), shape
    raise OutputContractError(f"the model fails on every probe input ({', '.join(map(str, shapes))}) for {task}: "
                              "check its input channels and size", (), task)


def resolve_task(module: Any, requested: str, meta: dict[str, Any], size: int, layout: str = "NCHW"
                 ) -> tuple[str, OutputContract, tuple[int, ...]]:
    """The build's task, its output contract and probe input. Raises :class:`OutputContractError` (exit 5)."""
    if requested not in TASK_CHOICES:
        raise UsageError(f"--task must be one of {TASK_CHOICES}, got {requested!r}")
    if requested != "auto":
        return (requested, *contract_for(module, requested, meta, size, layout))
    declared = meta.get("task")
    order = [declared] if declared in TASKS else []
    order += [t for t in TASKS if t not in order]
    errors: list[str] = []
    for task in order:
        try:
            return (task, *contract_for(module, task, meta, size, layout))
        except OutputContractError as exc:
            errors.append(f"as {task}: {exc}")
    raise OutputContractError("--task auto: the model's output fits no task this kit builds. "
                              + " | ".join(errors), (), "auto")
