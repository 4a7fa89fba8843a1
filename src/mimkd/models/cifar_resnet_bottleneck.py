"""The CIFAR bottleneck ResNet-50 of the RepDistiller zoo, registered as ``ResNet50``.

RepDistiller's ``models/resnetv2.py``: a 3x3 stride-1 stem (``conv1, bn1``, ReLU) and four stages of
:class:`CifarBottleneck` blocks ``(3, 4, 6, 3)`` with widths ``64, 128, 256, 512`` (x4 expansion), strides
``1, 2, 2, 2``; the shortcut is named ``shortcut`` (1x1 conv + BN, present when the stride or the channel
count changes), the classifier ``linear``. Not to be confused with the ImageNet ``resnet50`` (7x7 stem,
max-pool, ``downsample``/``fc`` names) in :mod:`mimkd.models.imagenet_resnet`.

Feature points: stem ``relu`` (64@32x32), ``layer1`` (256@32), ``layer2`` (512@16), ``layer3`` (1024@8),
``layer4`` (2048@4), embedding ``linear:input`` (2048); ``preact``: the residual sum of each stage's last
block.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from mimkd.models.layers import conv1x1, conv3x3, init_fan_out
from mimkd.models.registry import FeaturePoints, register_model

__all__ = ["CifarBottleneck", "CifarResNetV2"]


class CifarBottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 (x4) bottleneck with a ``shortcut`` Sequential (empty when the identity)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = conv1x1(planes, out_planes)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))
        self.preact = nn.Identity()
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu_out(self.preact(out + self.shortcut(x)))


class CifarResNetV2(nn.Module):
    """RepDistiller's CIFAR ResNet with bottleneck blocks (``resnetv2.py``)."""

    family: ClassVar[str] = "cifar_resnet_bottleneck"  # the architecture family (a fact about the model)

    def __init__(self, num_blocks: tuple[int, int, int, int], num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512 * CifarBottleneck.expansion, num_classes)
        init_fan_out(self)
        self.feature_points = FeaturePoints(
            stages=("relu", "layer1", "layer2", "layer3", "layer4"),
            preact=(None, *(f"layer{i + 1}.{n - 1}.preact" for i, n in enumerate(num_blocks))),
            embedding="linear:input",
            has_stem=True,
        )

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(CifarBottleneck(self.in_planes, planes, s))
            self.in_planes = planes * CifarBottleneck.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.linear(x)


@register_model("ResNet50")
def cifar_resnet50(num_classes: int = 100, in_channels: int = 3) -> CifarResNetV2:
    """RepDistiller's CIFAR ``ResNet50`` (bottleneck blocks 3/4/6/3, 3x3 stride-1 stem)."""
    return CifarResNetV2((3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels)
