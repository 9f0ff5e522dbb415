"""Reference architectures shipped with the kit (PyTorch; toolchain side only).

``resnet18s``: the ResNet-18 topology (BasicBlock, [2, 2, 2, 2], 7x7 stem + max-pool) at a reduced width so
that it trains on two CPU cores in minutes. Width 16 gives 16/32/64/128 channels (about 0.7 M parameters).
``act="relu6"`` bounds every activation to [0, 6], as MobileNets do for int8: uint8 activation ranges then stay
tight. Measured on the width-16 model with plain ReLU, static int8 moved decision margins by ~0.1 logit on
average, enough to flip 1-2 % of decisions at a locked threshold.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .unet import unet


def _act(name: str) -> nn.Module:
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "relu6":
        return nn.ReLU6(inplace=True)
    raise ValueError(f"unknown activation {name!r}; use 'relu' or 'relu6'")


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, act: str = "relu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = _act(act)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18S(nn.Module):
    """ResNet-18 topology with a configurable base width."""

    def __init__(self, num_classes: int = 2, width: int = 16, act: str = "relu") -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = _act(act)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        chans = [w, 2 * w, 4 * w, 8 * w]
        layers: list[nn.Module] = []
        cin = w
        for i, c in enumerate(chans):
            stride = 1 if i == 0 else 2
            layers.append(nn.Sequential(BasicBlock(cin, c, stride, act), BasicBlock(c, c, 1, act)))
            cin = c
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def vit_tiny(num_classes: int = 2, image_size: int = 224, patch_size: int = 16, num_layers: int = 4,
             num_heads: int = 4, hidden_dim: int = 128, mlp_dim: int = 256, conv_stem: bool = False) -> nn.Module:
    """A shrunk torchvision ViT (4 layers, 128 wide): the transformer family of fundus foundation models
    (RETFound, FLAIR, UrFound), small enough to train on a CPU. Softmax, GELU and LayerNorm make it PTQ-fragile.

    ``conv_stem``: four stride-2 3x3 convolutions instead of the 16x16 patch projection (Xiao et al. 2021,
    "Early convolutions help transformers see better"; torchvision's ``conv_stem_configs``). Measured here, the
    plain patch ViT did not learn the synthetic task from a few thousand images (loss stayed at the prior for
    3 epochs on 6,000 images); the transformer blocks are the same either way."""
    from torchvision.models import VisionTransformer
    from torchvision.models.vision_transformer import ConvStemConfig

    stem = None
    if conv_stem:
        if patch_size != 16:
            raise ValueError("conv_stem builds a stride-16 stem: use patch_size=16")
        stem = [ConvStemConfig(out_channels=c, kernel_size=3, stride=2) for c in (16, 32, 64, hidden_dim)]
    return VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                             num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim, num_classes=num_classes,
                             conv_stem_configs=stem)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet18s": ResNet18S,
    "vit_tiny": vit_tiny,
    "unet": unet,
}
