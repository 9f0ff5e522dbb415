"""``build --device PROFILE --device-gate``: after the build, its certification images through the device's kernels.

The same function as ``check --device`` (:func:`.device_gate.device_gate`), fed from the written bundle's
report: the certification images (all validation images when no fallback search selected on part of them), their
labels, and the host scores of the fp32 reference and of the int8 files the build gated. It runs after the
bundle is published (the worker loads a verified bundle), so its verdict is in the command's output and exit
code, not in the signed manifest; ``check --device`` re-runs it at any time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle.read import load_bundle
from ..errors import BundleError
from ..gate.gate import GateCriteria
from ..gate.stage import GateData
from ..quantization.calibration import prepare_inputs
from ..runtime.backends import BackendSettings
from .device_gate import DeviceGate, DeviceGateConfig, device_gate


def certification_indices(report: dict[str, Any]) -> list[int]:
    """Positions (in the validation order of ``report['scores']``) of the images that certified the build."""
    search: set[int] = set()
    for q in (report.get("quantization") or {}).values():
        search.update(int(i) for i in ((q.get("fallback") or {}).get("search_images") or {}).get("indices", []))
    return [i for i in range(len(report["labels"])) if i not in search]


def device_gate_after_build(out: Path, cfg: DeviceGateConfig, settings: BackendSettings | None = None,
                            log: Callable[[str], None] | None = None) -> DeviceGate:
    """The device gate on the certification images of the bundle just written to ``out``."""
    b = load_bundle(out)
    report = json.loads((Path(out) / "report.json").read_text())
    sources = list(report["images"]["certification"])
    idx = certification_indices(report)
    if len(idx) != len(sources):
        raise BundleError(f"{out}/report.json: {len(sources)} certification images but {len(idx)} positions")
    prepared = prepare_inputs(sources, b.preprocessing)
    if prepared.sources != [str(s) for s in sources]:
        raise BundleError("some certification images could not be read again: "
                          + "; ".join(s["message"] for s in prepared.skipped[:3]))
    data = GateData(prepared.tensors, b.preprocessing.layout, np.asarray(report["labels"], dtype=int)[idx],
                    b.positive_classes)
    host = {k: np.asarray(v, dtype=np.float64)[idx] for k, v in report["scores"].items()}
    crit = report.get("criteria") or {}
    criteria = GateCriteria(**{k: v for k, v in crit.items() if k in GateCriteria.__dataclass_fields__})
    reference = report["operating_point"]["locked_on"]
    fractions = {k: q.get("int8_mac_fraction") for k, q in (report.get("quantization") or {}).items()}
    return device_gate(b, sources, data, host, reference, b.operating_point.threshold, criteria,
                       [a.id for a in b.artifacts if a.id in host], cfg, settings, fractions, log)


__all__ = ["certification_indices", "device_gate_after_build"]
