"""ShuffleNetV2 (1x) of the RepDistiller zoo, registered as ``ShuffleV2``.

Layout (RepDistiller ``models/ShuffleNetv2.py``, ``net_size=1``, CIFAR variant): a 1x1 stem ``conv1`` (24
channels) + ``bn1`` + ReLU at full resolution; three stages ``layer1..3`` with widths 116 / 232 / 464, each a
:class:`DownBlock` (stride 2) followed by 3 / 7 / 3 :class:`SplitBlock` s; then ``conv2`` (1x1 -> 1024) +
``bn2`` + ReLU, global average pooling and the classifier ``linear``.

* ``DownBlock``: left branch depthwise 3x3/2 ``conv1, bn1`` -> 1x1 ``conv2, bn2``, ReLU; right branch 1x1
  ``conv3, bn3``, ReLU -> depthwise 3x3/2 ``conv4, bn4`` -> 1x1 ``conv5, bn5``, ReLU; concatenate
  ``[left, right]`` and channel-shuffle (2 groups).
* ``SplitBlock``: split channels in halves ``x1, x2``; ``x2`` -> 1x1 ``conv1, bn1``, ReLU -> depthwise 3x3
  ``conv2, bn2`` -> 1x1 ``conv3, bn3`` (= ``b``); output ``shuffle(cat([x1, relu(b)]))``. RepDistiller's
  ``preact`` of the block is ``cat([x1, b])`` WITHOUT the shuffle; the module ``preact`` outputs exactly that,
  and the block returns ``shuffle(relu(preact))``, the same value and gradients as RepDistiller's form because
  ``x1`` is a slice of a post-ReLU map (``x1 >= 0``; its zeros come from ReLUs that stop the gradient anyway).

Feature points (RepDistiller ``is_feat=True``): stem ``relu`` (24@32x32), ``layer1`` (116@16), ``layer2``
(232@8), ``layer3`` (464@4), embedding ``linear:input`` (1024); ``preact``: each stage's last-block
``preact``. Weights keep PyTorch's default initialisation, as in RepDistiller.

Deviation: ``F.avg_pool2d(out, 4)`` became ``AdaptiveAvgPool2d(1)`` (identical on 32x32 input).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from mimkd.models.layers import ChannelShuffle
from mimkd.models.registry import FeaturePoints, register_model

__all__ = ["SplitBlock", "DownBlock", "ShuffleNetV2"]


def _dw3x3(channels: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(channels, channels, 3, stride=stride, padding=1, groups=channels, bias=False)


def _pw(inp: int, oup: int) -> nn.Conv2d:
    return nn.Conv2d(inp, oup, kernel_size=1, bias=False)


class SplitBlock(nn.Module):
    """ShuffleNetV2 basic unit (state-dict names of RepDistiller's ``ShuffleNetv2.BasicBlock``)."""

    def __init__(self, in_channels: int, split_ratio: float = 0.5):
        super().__init__()
        self.split_ratio = split_ratio
        c = int(in_channels * split_ratio)
        self.conv1 = _pw(c, c)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2 = _dw3x3(c, 1)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = _pw(c, c)
        self.bn3 = nn.BatchNorm2d(c)
        self.relu3 = nn.ReLU()
        self.preact = nn.Identity()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = int(x.size(1) * self.split_ratio)
        x1, x2 = x[:, :c], x[:, c:]
        out = self.relu1(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.preact(torch.cat([x1, self.bn3(self.conv3(out))], 1))
        # relu(cat([x1, b])) == cat([x1, relu(b)]): x1 is a slice of a post-ReLU map (x1 >= 0)
        return self.shuffle(self.relu3(pre))


class DownBlock(nn.Module):
    """ShuffleNetV2 spatial down-sampling unit (stride 2, both branches convolved)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        mid = out_channels // 2
        self.conv1 = _dw3x3(in_channels, 2)
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = _pw(in_channels, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = _pw(in_channels, mid)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = _dw3x3(mid, 2)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = _pw(mid, mid)
        self.bn5 = nn.BatchNorm2d(mid)
        self.relu_left = nn.ReLU()
        self.relu_right1 = nn.ReLU()
        self.relu_right2 = nn.ReLU()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = self.relu_left(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu_right1(self.bn3(self.conv3(x)))
        right = self.relu_right2(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """RepDistiller's CIFAR ShuffleNetV2."""

    family: ClassVar[str] = "shufflenetv2"  # the architecture family (a fact about the model)

    def __init__(
        self,
        out_channels: tuple[int, int, int, int] = (116, 232, 464, 1024),
        num_blocks: tuple[int, int, int] = (3, 7, 3),
        num_classes: int = 100,
        in_channels: int = 3,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.relu2 = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.feature_points = FeaturePoints(
            stages=("relu", "layer1", "layer2", "layer3"),
            preact=(None, *(f"layer{i + 1}.{n}.preact" for i, n in enumerate(num_blocks))),
            embedding="linear:input",
            has_stem=True,
        )

    def _make_layer(self, out_channels: int, num_blocks: int) -> nn.Sequential:
        layers: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        layers += [SplitBlock(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


@register_model("ShuffleV2")
def shufflev2(num_classes: int = 100, in_channels: int = 3) -> ShuffleNetV2:
    """RepDistiller's ``ShuffleV2`` (net_size 1: 116/232/464, blocks 3/7/3, conv2 -> 1024, 1x1 stem), §0."""
    return ShuffleNetV2(num_classes=num_classes, in_channels=in_channels)
