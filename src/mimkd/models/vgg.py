"""VGG-BN networks of the RepDistiller zoo: vgg8, vgg11, vgg13, vgg16, vgg19.

Five blocks ``block0..4``, each ``Sequential(conv3x3 (with bias), BN, ReLU, conv3x3, BN, ...)`` with the LAST
ReLU removed (so the block output is a BatchNorm output and the state-dict indices skip the ReLUs: ``0, 1, 3,
4, ...``). The forward applies a ReLU after every block; max-pools (2x2) follow blocks 0, 1 and 2; between
block3 and block4 the max-pool runs only for 64x64 input (RepDistiller's ``if h == 64`` rule, kept as is), so
a 32x32 input gives block3 and block4 at 4x4. Then global average pooling and ``classifier`` (512 -> classes).

Feature points (RepDistiller ``is_feat=True``): ``relu0`` (64@32x32), ``relu1`` (128@16), ``relu2`` (256@8),
``relu3`` (512@4), ``relu4`` (512@4), embedding ``classifier:input`` (512); ``preact=True`` variants are the
block outputs ``block1..4`` (the stem, as in RepDistiller's list, has none).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from mimkd.models.layers import init_fan_out
from mimkd.models.registry import FeaturePoints, register_model

__all__ = ["VGG", "VGG_CONFIGS"]

VGG_CONFIGS: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_block(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for v in widths:
        layers += [nn.Conv2d(in_channels, v, kernel_size=3, padding=1), nn.BatchNorm2d(v), nn.ReLU()]
        in_channels = v
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """RepDistiller's CIFAR VGG with batch norm."""

    family: ClassVar[str] = "vgg"  # the architecture family (a fact about the model)

    def __init__(self, cfg: list[list[int]], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.block0 = _make_block(cfg[0], in_channels)
        self.block1 = _make_block(cfg[1], cfg[0][-1])
        self.block2 = _make_block(cfg[2], cfg[1][-1])
        self.block3 = _make_block(cfg[3], cfg[2][-1])
        self.block4 = _make_block(cfg[4], cfg[3][-1])
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.relu0 = nn.ReLU()
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.relu3 = nn.ReLU()
        self.relu4 = nn.ReLU()
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        init_fan_out(self, linear="normal")
        self.feature_points = FeaturePoints(
            stages=("relu0", "relu1", "relu2", "relu3", "relu4"),
            preact=(None, "block1", "block2", "block3", "block4"),
            embedding="classifier:input",
            has_stem=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if h == 64:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        x = torch.flatten(self.pool4(x), 1)
        return self.classifier(x)


def _register(name: str) -> None:
    def factory(num_classes: int = 100, in_channels: int = 3) -> VGG:
        return VGG(VGG_CONFIGS[name], num_classes=num_classes, in_channels=in_channels)

    factory.__name__ = name
    factory.__doc__ = f"RepDistiller's CIFAR {name} with batch norm."
    register_model(name)(factory)


for _name in VGG_CONFIGS:
    _register(_name)
