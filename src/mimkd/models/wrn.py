"""Wide ResNets of the RepDistiller zoo: wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2.

``wrn_d_w``: depth ``6n + 4``, widths ``16, 16w, 32w, 64w``. A 3x3 stem ``conv1`` (no BN / ReLU), three
``NetworkBlock`` s (``block1..3``, strides 1, 2, 2) of ``n`` pre-activation :class:`WideBasic` blocks, then a
final ``bn1`` + ReLU, global average pooling and ``fc``. A block is ``bn1, relu1, conv1, bn2, relu2, conv2``
plus a 1x1 ``convShortcut`` when its input and output widths differ; in that case (as in RepDistiller) the
shortcut is taken from the activated input ``relu1(bn1(x))``, otherwise from ``x`` itself.

Feature points (RepDistiller ``is_feat=True``): ``conv1`` (16@32x32), ``block1`` (32), ``block2`` (16),
``block3`` (8x8, BEFORE the final BN-ReLU), embedding ``fc:input``. RepDistiller's ``preact=True`` list
applies the next BatchNorm to each stage output: ``block2.layer.0.bn1`` for f1, ``block3.layer.0.bn1`` for f2
and the final ``bn1`` for f3; the stem has none.

Deviation: ``F.avg_pool2d(out, 8)`` became ``AdaptiveAvgPool2d(1)`` (identical on 32x32 input).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkd.models.layers import init_fan_out
from mimkd.models.registry import FeaturePoints, register_model

__all__ = ["WideBasic", "NetworkBlock", "WideResNet"]


class WideBasic(nn.Module):
    """Pre-activation wide-ResNet block (state-dict names of RepDistiller's ``wrn.BasicBlock``)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.convShortcut = None
        if in_planes != out_planes:
            self.convShortcut = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(act)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A stage of ``nb_layers`` :class:`WideBasic` blocks held in ``self.layer``."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.layer = nn.Sequential(
            *(
                WideBasic(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, drop_rate)
                for i in range(nb_layers)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """RepDistiller's WRN-``depth``-``widen_factor``."""

    family: ClassVar[str] = "wrn"  # the architecture family (a fact about the model)

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int = 100,
        in_channels: int = 3,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        ch = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, ch[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, ch[0], ch[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, ch[1], ch[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, ch[2], ch[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch[3], num_classes)
        self.nChannels = ch[3]
        init_fan_out(self, zero_linear_bias=True)
        self.feature_points = FeaturePoints(
            stages=("conv1", "block1", "block2", "block3"),
            preact=(None, "block2.layer.0.bn1", "block3.layer.0.bn1", "bn1"),
            embedding="fc:input",
            has_stem=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = self.relu(self.bn1(out))
        out = torch.flatten(self.avgpool(out), 1)
        return self.fc(out)


def _register(depth: int, width: int) -> None:
    name = f"wrn_{depth}_{width}"

    def factory(num_classes: int = 100, in_channels: int = 3, drop_rate: float = 0.0) -> WideResNet:
        return WideResNet(depth, width, num_classes=num_classes, in_channels=in_channels, drop_rate=drop_rate)

    factory.__name__ = name
    factory.__doc__ = f"RepDistiller's WRN-{depth}-{width}."
    register_model(name)(factory)


for _depth, _width in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _register(_depth, _width)
