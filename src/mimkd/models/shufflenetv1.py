"""ShuffleNetV1 of the RepDistiller zoo, registered as ``ShuffleV1``.

Layout (RepDistiller ``models/ShuffleNetv1.py``, CIFAR variant): a 1x1 stem ``conv1`` (24 channels) + ``bn1``
+ ReLU at full resolution (no stride, no max-pool); three stages ``layer1..3`` of 4 / 8 / 4
:class:`ShuffleUnit` s with output widths 240 / 480 / 960 and 3 groups; global average pooling; classifier
``linear``.

A unit: grouped 1x1 ``conv1`` (1 group in the very first unit, whose input is the 24-channel stem) -> ``bn1``
-> ReLU -> channel shuffle -> depthwise 3x3 ``conv2`` (stride) -> ``bn2`` -> ReLU (RepDistiller keeps this
ReLU) -> grouped 1x1 ``conv3`` -> ``bn3``. The first unit of a stage has stride 2, an ``AvgPool2d(3, 2, 1)``
shortcut and concatenates ``[branch, shortcut]`` (so its branch produces ``out - in`` channels); the others
add the identity. The unit output is the ReLU of that sum / concatenation, which ``preact`` exposes.

Feature points (RepDistiller ``is_feat=True``): stem ``relu`` (24@32x32), ``layer1`` (240@16), ``layer2``
(480@8), ``layer3`` (960@4), embedding ``linear:input``; ``preact``: each stage's last-unit ``preact``.
Weights keep PyTorch's default initialisation, as in RepDistiller.

Deviation: ``F.avg_pool2d(out, 4)`` became ``AdaptiveAvgPool2d(1)`` (identical on 32x32 input).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from mimkd.models.layers import ChannelShuffle
from mimkd.models.registry import FeaturePoints, register_model

__all__ = ["ShuffleUnit", "ShuffleNetV1"]


class ShuffleUnit(nn.Module):
    """One ShuffleNetV1 bottleneck unit (state-dict names of RepDistiller's ``ShuffleNetv1.Bottleneck``)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int, first_groups: int):
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=first_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.relu1 = nn.ReLU()
        self.shuffle1 = ChannelShuffle(first_groups)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut: nn.Module = nn.AvgPool2d(3, stride=2, padding=1) if stride == 2 else nn.Identity()
        self.preact = nn.Identity()
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.shuffle1(self.relu1(self.bn1(self.conv1(x))))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        pre = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return self.relu_out(self.preact(pre))


class ShuffleNetV1(nn.Module):
    """RepDistiller's CIFAR ShuffleNetV1."""

    family: ClassVar[str] = "shufflenetv1"  # the architecture family (a fact about the model)

    def __init__(
        self,
        out_planes: tuple[int, int, int] = (240, 480, 960),
        num_blocks: tuple[int, int, int] = (4, 8, 4),
        groups: int = 3,
        num_classes: int = 100,
        in_channels: int = 3,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups, first_stage=True)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_planes[2], num_classes)
        self.feature_points = FeaturePoints(
            stages=("relu", "layer1", "layer2", "layer3"),
            preact=(None, *(f"layer{i + 1}.{n - 1}.preact" for i, n in enumerate(num_blocks))),
            embedding="linear:input",
            has_stem=True,
        )

    def _make_layer(
        self, out_planes: int, num_blocks: int, groups: int, first_stage: bool = False
    ) -> nn.Sequential:
        layers = []
        for i in range(num_blocks):
            stride = 2 if i == 0 else 1
            cat_planes = self.in_planes if i == 0 else 0
            # the first unit of the network reads the 24-channel stem: its 1x1 conv is not grouped
            first_groups = 1 if (first_stage and i == 0) else groups
            layers.append(ShuffleUnit(self.in_planes, out_planes - cat_planes, stride, groups, first_groups))
            self.in_planes = out_planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


@register_model("ShuffleV1")
def shufflev1(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV1:
    """RepDistiller's ``ShuffleV1``: out planes 240/480/960, blocks 4/8/4, groups 3, 1x1 stem."""
    return ShuffleNetV1(num_classes=num_classes, in_channels=in_channels)
