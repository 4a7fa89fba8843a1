"""MobileNetV2 of the RepDistiller zoo ("mobile_half": T=6, width 0.5), registered as ``MobileNetV2``.

Layout (RepDistiller ``models/mobilenetv2.py``): stem ``conv1`` = ``Sequential(conv3x3 stride 2, BN, ReLU)``
(16 channels, so a 32x32 input is at 16x16 after the stem); seven stages ``blocks.0..6`` of inverted residuals
with settings ``(t, c, n, s)`` = (1,16,1,1), (T,24,2,1), (T,32,3,2), (T,64,4,2), (T,96,3,1), (T,160,3,2),
(T,320,1,1), channels scaled by the width (``int(c * 0.5)``). Every inverted residual has the expansion 1x1
conv, even for t=1 (``conv.0..7`` = pw conv, BN, ReLU, dw conv, BN, ReLU, pw-linear conv, BN), and adds its
input when the stride is 1 and the width is unchanged. Then ``conv2`` = ``Sequential(conv1x1 -> 1280, BN,
ReLU)``, global average pooling and ``classifier = Sequential(Linear(1280, classes))``.

Feature points (RepDistiller ``is_feat=True``): ``conv1`` (16@16x16), ``blocks.1`` (12@16), ``blocks.2``
(16@8), ``blocks.4`` (48@4), ``blocks.6`` (160@2), embedding ``classifier:input`` (1280). The stage outputs
are linear bottleneck outputs with no activation after them; RepDistiller's ``preact=True`` list is identical
to the normal one, so ``preact`` names the same modules for the stages (and ``None`` for the stem).

Deviation: RepDistiller's ``AvgPool2d(2, ceil_mode=True)`` became ``AdaptiveAvgPool2d(1)`` (identical on
32x32).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from mimkd.models.layers import init_fan_out
from mimkd.models.registry import FeaturePoints, register_model

__all__ = ["InvertedResidual", "MobileNetV2"]


def _conv_bn_relu(inp: int, oup: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(oup), nn.ReLU()
    )


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> project (1x1, linear); residual when stride 1 and ``inp == oup``."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """RepDistiller's MobileNetV2 with expansion ``T`` and width multiplier ``width_mult``."""

    family: ClassVar[str] = "mobilenetv2"  # the architecture family (a fact about the model)

    def __init__(self, T: int = 6, width_mult: float = 0.5, num_classes: int = 100, in_channels: int = 3):
        super().__init__()
        settings = [
            (1, 16, 1, 1),
            (T, 24, 2, 1),
            (T, 32, 3, 2),
            (T, 64, 4, 2),
            (T, 96, 3, 1),
            (T, 160, 3, 2),
            (T, 320, 1, 1),
        ]
        input_channel = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(in_channels, input_channel, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in settings:
            output_channel = int(c * width_mult)
            layers = []
            for stride in [s] + [1] * (n - 1):
                layers.append(InvertedResidual(input_channel, output_channel, stride, t))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(input_channel, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        init_fan_out(self, linear="normal")
        stages = ("blocks.1", "blocks.2", "blocks.4", "blocks.6")
        self.feature_points = FeaturePoints(
            stages=("conv1", *stages),
            preact=(None, *stages),
            embedding="classifier:input",
            has_stem=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        for block in self.blocks:
            out = block(out)
        out = self.conv2(out)
        out = torch.flatten(self.avgpool(out), 1)
        return self.classifier(out)


@register_model("MobileNetV2")
def mobilenetv2_half(num_classes: int = 100, in_channels: int = 3) -> MobileNetV2:
    """RepDistiller's ``mobile_half``: MobileNetV2 with T=6, width 0.5, last channel 1280."""
    return MobileNetV2(T=6, width_mult=0.5, num_classes=num_classes, in_channels=in_channels)
