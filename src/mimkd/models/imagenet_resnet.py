"""ImageNet ResNet-18/34/50 in the torchvision layout, registered as ``resnet18``, ``resnet34``, ``resnet50``.

Stem ``conv1`` (7x7, stride 2, 64) -> ``bn1`` -> ``relu`` -> ``maxpool`` (3x3, stride 2); stages ``layer1..4``
(widths 64, 128, 256, 512, strides 1, 2, 2, 2) of :class:`~mimkd.models.layers.BasicBlock` (18: 2-2-2-2, 34:
3-4-6-3) or :class:`Bottleneck` (50: 3-4-6-3, x4 expansion, stride on the 3x3 conv, torchvision's "v1.5");
``downsample`` = 1x1 conv + BN shortcut where the shape changes; ``avgpool`` (adaptive) and ``fc``. State-dict
names equal torchvision's, so torchvision-format checkpoints load with ``strict=True``. torchvision itself is
never imported. Parameter counts for 1000 classes: 11,689,512 / 21,797,672 / 25,557,032.

Feature points (RepDistiller's, extended to four stages): stem ``relu`` (64@112x112 for 224 input, before
the max-pool), ``layer1`` (56), ``layer2`` (28), ``layer3`` (14), ``layer4`` (7), embedding ``fc:input``;
``preact``: the residual sum of each stage's last block (none for the stem). All ReLUs are out-of-place.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from mimkd.models.layers import BasicBlock, conv1x1, conv3x3, init_fan_out
from mimkd.models.registry import FeaturePoints, register_model

__all__ = ["Bottleneck", "ImageNetResNet"]


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck: ``conv1, bn1, conv2 (stride), bn2, conv3, bn3, downsample``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample
        self.preact = nn.Identity()
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu_out(self.preact(out + identity))


class ImageNetResNet(nn.Module):
    """torchvision-layout ResNet for ImageNet-sized input."""

    family: ClassVar[str] = "imagenet_resnet"  # the architecture family (a fact about the model)

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: tuple[int, int, int, int],
        num_classes: int = 1000,
        in_channels: int = 3,
    ):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_fan_out(self)
        self.feature_points = FeaturePoints(
            stages=("relu", "layer1", "layer2", "layer3", "layer4"),
            preact=(None, *(f"layer{i + 1}.{n - 1}.preact" for i, n in enumerate(layers))),
            embedding="fc:input",
            has_stem=True,
        )

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, blocks: int, stride: int
    ) -> nn.Sequential:
        downsample = None
        out_planes = planes * block.expansion
        if stride != 1 or self.inplanes != out_planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, out_planes, stride), nn.BatchNorm2d(out_planes))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = out_planes
        layers += [block(out_planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register_model("resnet18")
def resnet18(num_classes: int = 1000, in_channels: int = 3) -> ImageNetResNet:
    """ImageNet ResNet-18 (torchvision layout)."""
    return ImageNetResNet(BasicBlock, (2, 2, 2, 2), num_classes=num_classes, in_channels=in_channels)


@register_model("resnet34")
def resnet34(num_classes: int = 1000, in_channels: int = 3) -> ImageNetResNet:
    """ImageNet ResNet-34 (torchvision layout)."""
    return ImageNetResNet(BasicBlock, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels)


@register_model("resnet50")
def resnet50(num_classes: int = 1000, in_channels: int = 3) -> ImageNetResNet:
    """ImageNet ResNet-50 (torchvision layout, stride on the 3x3 conv)."""
    return ImageNetResNet(Bottleneck, (3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels)
