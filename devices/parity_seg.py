"""x86 vs emulated-Arm parity of one segmentation artifact: the working-resolution vessel probability maps of the
two machines, photo by photo (devices/worker_seg.py writes them).

Rules: the same photos segmented (and failed, with the same codes) on both machines; every photo's binary masks
at the bundle's threshold overlap with Dice >= ``MIN_MASK_DICE`` (fp32: also max |Δp| <= ``FP32_PROB_ATOL``;
int8 kernels of two CPUs may round a requantization differently, so int8 is held to the masks, not the bits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .worker_seg import map_key

FP32_PROB_ATOL = 1e-4
MIN_MASK_DICE = 0.995


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


@dataclass(frozen=True)
class SegParity:
    artifact: str
    precision: str
    n: int  # photos segmented on both machines
    max_abs_prob: float
    mask_dice: tuple[float, ...]
    inputs_identical: int  # photos whose tiles were bit-identical on both machines
    errors_agree: bool
    rule: str
    failures: tuple[str, ...]

    def __bool__(self) -> bool:
        return not self.failures and self.errors_agree

    @property
    def passed(self) -> bool:
        return bool(self)

    @property
    def min_mask_dice(self) -> float:
        return min(self.mask_dice, default=1.0)

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "precision": self.precision, "passed": self.passed, "rule": self.rule,
                "n": self.n, "max_abs_prob": self.max_abs_prob, "mask_dice": list(self.mask_dice),
                "min_mask_dice": self.min_mask_dice, "inputs_identical": self.inputs_identical,
                "errors_agree": self.errors_agree, "failures": list(self.failures)}

    def row(self) -> str:
        return (f"{self.artifact:<12} {self.precision:<5} n={self.n:<4} max|Δp|={self.max_abs_prob:.2e}  "
                f"min mask Dice {self.min_mask_dice:.5f}  tiles identical {self.inputs_identical}/{self.n}  "
                f"{self.rule:<30} {'PASS' if self else 'FAIL'}")


def seg_parity(artifact: str, precision: str, host: dict[str, np.ndarray], emulated: dict[str, np.ndarray],
               host_results: list[dict[str, Any]], emu_results: list[dict[str, Any]], threshold: float) -> SegParity:
    """Compare the maps of one artifact on the host and on the emulated device."""
    failures: list[str] = []
    dices: list[float] = []
    worst = 0.0
    same_inputs = 0
    for i, (h, e) in enumerate(zip(host_results, emu_results, strict=False)):
        a, b = host.get(map_key(artifact, i)), emulated.get(map_key(artifact, i))
        if a is None or b is None:
            if (a is None) != (b is None):
                failures.append(f"{h.get('source')}: segmented on one machine only")
            continue
        if a.shape != b.shape:
            failures.append(f"{h.get('source')}: map shapes differ {a.shape} vs {b.shape}")
            continue
        worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)))
        dices.append(_dice(a >= threshold, b >= threshold))
        same_inputs += bool(h.get("input_sha256")) and h.get("input_sha256") == e.get("input_sha256")
    rule = f"mask Dice >= {MIN_MASK_DICE:g}" + (f", |Δp| <= {FP32_PROB_ATOL:g}" if precision != "int8" else "")
    if dices and min(dices) < MIN_MASK_DICE:
        failures.append(f"mask Dice {min(dices):.5f} < {MIN_MASK_DICE:g}")
    if precision != "int8" and worst > FP32_PROB_ATOL:
        failures.append(f"max |Δp| {worst:.3g} > {FP32_PROB_ATOL:g}")
    if not dices and not failures:
        failures.append("no photo was segmented on both machines")
    errors_agree = len(host_results) == len(emu_results) and all(
        (h.get("error") or {}).get("code") == (e.get("error") or {}).get("code")
        for h, e in zip(host_results, emu_results, strict=False))
    return SegParity(artifact, precision, len(dices), worst, tuple(dices), same_inputs, errors_agree, rule,
                     tuple(failures))
