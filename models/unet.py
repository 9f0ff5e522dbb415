"""A small U-Net for retinal vessel segmentation (Ronneberger et al. 2015), export-friendly.

Only convolutions, batch norm, ReLU, 2x2 max-pool, bilinear 2x upsampling and concatenation: every op maps to
ONNX and TFLite builtins and quantises to int8. The output is ``[N, 1, H, W]`` logits: the sigmoid stays out of
the model (the runtime applies it in float), so the head is never squeezed into uint8 probabilities.
With ``width=16`` and ``depth=3`` it has about 0.47 M parameters; inputs must be multiples of ``2 ** depth``.
"""

from __future__ import annotations

import torch
from torch import nn


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with ``depth`` down-samplings; channel widths ``width * 2 ** level``.

    ``num_classes`` is the number of output maps (1 for vessels) so that the kit's loader can build it by name.
    """

    def __init__(self, num_classes: int = 1, in_channels: int = 1, width: int = 16, depth: int = 3) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError("depth must be >= 1")
        chans = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.down.append(_double_conv(cin, c))
            cin = c
        self.pool = nn.MaxPool2d(2)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.up = nn.ModuleList(_double_conv(chans[i + 1] + chans[i], chans[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(chans[0], num_classes, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            x = block(torch.cat([self.upsample(x), skips.pop()], dim=1))
        return self.head(x)


def unet(num_classes: int = 1, in_channels: int = 1, width: int = 16, depth: int = 3) -> UNet:
    return UNet(num_classes=num_classes, in_channels=in_channels, width=width, depth=depth)
