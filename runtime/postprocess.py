"""Model outputs -> referable probability. One implementation for the gate, `compare` and the device."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def referable_probability(outputs: np.ndarray, positive_classes: list[int]) -> np.ndarray:
    """Probability of a referable eye per row of ``outputs`` (logits).

    One output column: a sigmoid logit. Several: softmax, summed over the positive (referable) classes.
    """
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim == 1:
        out = out[None, :]
    if out.shape[-1] == 1:
        return 1.0 / (1.0 + np.exp(-out[:, 0]))
    return softmax(out)[:, positive_classes].sum(axis=-1)


def referable_margin(outputs: np.ndarray, positive_classes: list[int]) -> np.ndarray:
    """The decision margin in logit space, log(p / (1 - p)): unsaturated, good for ranking sensitivity."""
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim == 1:
        out = out[None, :]
    if out.shape[-1] == 1:
        return out[:, 0]
    pos = np.zeros(out.shape[-1], dtype=bool)
    pos[positive_classes] = True
    m = out.max(axis=-1, keepdims=True)
    lse_pos = np.log(np.exp(out[:, pos] - m).sum(-1)) + m[:, 0]
    lse_neg = np.log(np.exp(out[:, ~pos] - m).sum(-1)) + m[:, 0]
    return lse_pos - lse_neg
