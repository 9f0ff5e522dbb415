"""The output contract at intake: classifiers [N, C], segmenters [N, C, H, W] at the input's resolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fundus_edge.errors import ModelLoadError, OutputContractError, UsageError
from fundus_edge.export.contract import check_output
from fundus_edge.export.validate import torch_outputs

NCHW = (1, 3, 64, 64)


class TinySeg(nn.Module):
    """A vessel-U-Net-shaped toy: one logit per pixel at the input's resolution."""

    def __init__(self, channels_last_out: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)
        self.channels_last_out = channels_last_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y.permute(0, 2, 3, 1) if self.channels_last_out else y


class TinyCls(nn.Module):
    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def test_classifier_outputs_pass() -> None:
    probe = torch_outputs(TinyCls(2), np.zeros(NCHW, np.float32))
    c = check_output(probe.shape, "classification", NCHW, dtype=probe.dtype)
    assert c.num_outputs == 2 and c.task == "classification" and c.shape == (1, 2)
    assert check_output((4, 1), "classification", (4, 3, 64, 64)).num_outputs == 1  # one referable logit
    assert check_output((1, 5), "classification", (1, 64, 64, 3), layout="NHWC").to_dict() == {
        "task": "classification", "shape": [1, 5], "num_outputs": 5}


def test_segmentation_map_is_not_read_as_224_classes() -> None:
    """Today's build reads probe.shape[-1]: a [1, 1, 64, 64] map would be '64 classes'. The contract says why."""
    probe = torch_outputs(TinySeg(), np.zeros(NCHW, np.float32))
    assert probe.shape == (1, 1, 64, 64)
    with pytest.raises(OutputContractError) as exc:
        check_output(probe.shape, "classification", NCHW, dtype=probe.dtype)
    msg = str(exc.value)
    assert "[1, 1, 64, 64]" in msg and "--task segmentation" in msg
    assert isinstance(exc.value, ModelLoadError) and exc.value.exit_code == 5
    assert exc.value.code == "output-contract" and exc.value.shape == (1, 1, 64, 64)
    c = check_output(probe.shape, "segmentation", NCHW, dtype=probe.dtype)
    assert c.num_outputs == 1 and c.task == "segmentation"


def test_segmentation_needs_input_resolution_and_channels_first() -> None:
    with pytest.raises(OutputContractError, match=r"\[1, 1, 32, 32\].*32x32 for a 64x64 input.*interpolate"):
        check_output((1, 1, 32, 32), "segmentation", NCHW)
    probe = torch_outputs(TinySeg(channels_last_out=True), np.zeros(NCHW, np.float32))
    with pytest.raises(OutputContractError, match=r"channels-last.*permute"):
        check_output(probe.shape, "segmentation", NCHW)
    with pytest.raises(OutputContractError, match=r"channels-last.*--task segmentation"):
        check_output(probe.shape, "classification", NCHW)
    with pytest.raises(OutputContractError, match=r"without a channel axis.*unsqueeze"):
        check_output((1, 64, 64), "segmentation", NCHW)
    with pytest.raises(OutputContractError, match=r"classifier: build it with --task classification"):
        check_output((1, 2), "segmentation", NCHW)
    # NHWC input: H and W are axes 1 and 2 of the input
    assert check_output((1, 2, 48, 40), "segmentation", (1, 48, 40, 3), layout="NHWC").num_outputs == 2


def test_other_bad_outputs_name_the_fix() -> None:
    with pytest.raises(OutputContractError, match=r"\[1\]: one value per image.*unsqueeze"):
        check_output((1,), "classification", NCHW)
    with pytest.raises(OutputContractError, match=r"trailing 1x1.*flatten"):
        check_output((1, 2, 1, 1), "classification", NCHW)
    with pytest.raises(OutputContractError, match=r"first axis is not the batch"):
        check_output((2, 1), "classification", (4, 3, 64, 64))
    with pytest.raises(OutputContractError, match=r"int64 values.*argmax"):
        check_output((1,), "classification", NCHW, dtype=np.dtype("int64"))
    with pytest.raises(OutputContractError, match=r"int64"):
        check_output((1, 2), "classification", NCHW, dtype=torch.int64)
    with pytest.raises(OutputContractError, match=r"\[1, 2, 3\]: not classification logits"):
        check_output((1, 2, 3), "classification", NCHW)
    with pytest.raises(UsageError, match="unknown task"):
        check_output((1, 2), "detection", NCHW)
