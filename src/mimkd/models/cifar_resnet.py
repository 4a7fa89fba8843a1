"""CIFAR ResNets of the RepDistiller zoo: resnet8/14/20/32/44/56/110 and resnet8x4/32x4.

Depth ``6n + 2``: a 3x3 stem (``conv1, bn1, relu``) and three stages of ``n`` :class:`BasicBlock` s (strides
1, 2, 2), then global average pooling and ``fc``. A block gets a ``downsample`` shortcut (1x1 conv + BN)
whenever its stride is not 1 or its channel count changes. Widths are ``(16, 16, 32, 64)`` or, for the ``x4``
models, ``(32, 64, 128, 256)``. The state_dict matches RepDistiller's ``models/resnet.py`` key for key, so
CRD-benchmark checkpoints load with ``strict=True``.

Feature points (RepDistiller ``is_feat=True``): stem ``relu`` (32x32), ``layer1`` (32x32), ``layer2`` (16x16),
``layer3`` (8x8), embedding ``fc:input``; ``preact=True`` variants are the residual sums of each stage's last
block (``layerK.{n-1}.preact``), the stem having none.

Deviation: RepDistiller pools with ``AvgPool2d(8)``; we use ``AdaptiveAvgPool2d(1)`` (identical on 32x32
input, and it accepts 28x28 or 64x64 input).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from mimkd.models.layers import BasicBlock, conv1x1, init_fan_out
from mimkd.models.registry import FeaturePoints, register_model

__all__ = ["CifarResNet"]


class CifarResNet(nn.Module):
    """RepDistiller's CIFAR ResNet of depth ``6n + 2`` with stage widths ``widths[1:]``."""

    family: ClassVar[str] = "cifar_resnet"  # the architecture family (a fact about the model)

    def __init__(
        self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100, in_channels: int = 3
    ):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(widths[1], n, stride=1)
        self.layer2 = self._make_layer(widths[2], n, stride=2)
        self.layer3 = self._make_layer(widths[3], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_fan_out(self)
        last = n - 1
        self.feature_points = FeaturePoints(
            stages=("relu", "layer1", "layer2", "layer3"),
            preact=(None, f"layer1.{last}.preact", f"layer2.{last}.preact", f"layer3.{last}.preact"),
            embedding="fc:input",
            has_stem=True,
        )

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


_THIN = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def _register(name: str, depth: int, widths: tuple[int, int, int, int]) -> None:
    def factory(num_classes: int = 100, in_channels: int = 3) -> CifarResNet:
        return CifarResNet(depth, widths, num_classes=num_classes, in_channels=in_channels)

    factory.__name__ = name
    factory.__doc__ = f"RepDistiller's CIFAR {name}: depth {depth}, widths {widths}."
    register_model(name)(factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(f"resnet{_depth}", _depth, _THIN)
_register("resnet8x4", 8, _WIDE)
_register("resnet32x4", 32, _WIDE)
