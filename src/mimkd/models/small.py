"""Small CNNs for the Fashion-MNIST stand-in (28x28, 1 channel, 10 classes): ``conv4mp``, ``conv4mp_w32``,
``cnn_teacher``. They follow RepDistiller's feature list (stage maps, then the pre-classifier vector); as
in every zoo model, the first conv-BN-ReLU counts as the stem (``feat[0]``), so the maps the feature methods
use (``feat[1:-1]``) start at the second block. Convolutions are 3x3, padding 1, bias-free, then BatchNorm;
weights use the zoo's Kaiming (fan-out) initialisation, linear layers PyTorch's default.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn

from mimkd.models.layers import conv3x3, init_fan_out
from mimkd.models.registry import FeaturePoints, register_model

__all__ = ["Conv4MP", "CNNTeacher"]


def _conv_bn_relu(inp: int, oup: int) -> nn.Sequential:
    return nn.Sequential(conv3x3(inp, oup), nn.BatchNorm2d(oup), nn.ReLU())


class Conv4MP(nn.Module):
    """Conv4-MP, the MIMKD paper's shallow student, which the paper leaves undefined: the classic Conv-4.

    Layout, width ``w`` (64 by default), ``c`` input channels, ``K`` classes::

        block1: conv3x3 c->w, BN, ReLU    (32x32 | 28x28)  -> pool1 max 2x2 -> 16x16 | 14x14
        block2: conv3x3 w->w, BN, ReLU    (16x16 | 14x14)  -> pool2         ->  8x8  |  7x7
        block3: conv3x3 w->w, BN, ReLU    ( 8x8  |  7x7 )  -> pool3         ->  4x4  |  3x3
        block4: conv3x3 w->w, BN, ReLU    ( 4x4  |  3x3 )  -> pool4         ->  2x2  |  1x1
        avgpool (global) -> flatten (w) -> fc: Linear(w, K)

    Parameters: ``9*c*w + 2*w + 3*(9*w*w + 2*w) + w*K + K``; for c=1, K=10: 112,330 (w=64), 28,522 (w=32).

    Feature points: the post-ReLU map of each block BEFORE its max-pool (``block1..4``: 28, 14, 7, 3 for a
    28x28 input), ``block1`` being the stem; embedding ``fc:input`` (the ``w``-d pooled vector); no
    pre-activation points.
    """

    family: ClassVar[str] = "small"  # the architecture family (a fact about the model)

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 64):
        super().__init__()
        self.block1 = _conv_bn_relu(in_channels, width)
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = _conv_bn_relu(width, width)
        self.pool2 = nn.MaxPool2d(2)
        self.block3 = _conv_bn_relu(width, width)
        self.pool3 = nn.MaxPool2d(2)
        self.block4 = _conv_bn_relu(width, width)
        self.pool4 = nn.MaxPool2d(2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(width, num_classes)
        init_fan_out(self)
        self.feature_points = FeaturePoints(
            stages=("block1", "block2", "block3", "block4"),
            preact=(None, None, None, None),
            embedding="fc:input",
            has_stem=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.pool3(self.block3(x))
        x = self.pool4(self.block4(x))
        return self.fc(self.flatten(self.avgpool(x)))


class CNNTeacher(nn.Module):
    """A cheap CNN teacher for the Fashion-MNIST stand-in (about 0.9M parameters).

    Layout (``c`` input channels, ``K`` classes), sizes for a 28x28 input::

        block1: conv3x3 c->32, BN, ReLU    28x28 -> pool1 max 2x2 -> 14x14
        block2: conv3x3 32->64, BN, ReLU   14x14 -> pool2 max 2x2 ->  7x7
        block3: conv3x3 64->128, BN, ReLU   7x7
        pool3: AdaptiveAvgPool2d((7, 7)) (identity at 28x28; lets other sizes through) -> flatten 6272
        hidden: Linear(6272, 128) -> hidden_relu: ReLU -> dropout: Dropout(0.3) -> fc: Linear(128, K)

    Parameters: ``9*c*32 + 64 + 18,432 + 128 + 73,728 + 256 + 6272*128 + 128 + 128*K + K``; 897,130 for c=1,
    K=10.

    Feature points: ``block1..3`` (post-ReLU, 28 / 14 / 7), ``block1`` being the stem. The embedding is
    ``hidden_relu``: the 128-d post-ReLU hidden vector BEFORE dropout, so the captured value is dropout-free
    in training too (in eval mode it equals ``fc``'s input).
    """

    family: ClassVar[str] = "small"  # the architecture family (a fact about the model)

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dropout: float = 0.3):
        super().__init__()
        self.block1 = _conv_bn_relu(in_channels, 32)
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = _conv_bn_relu(32, 64)
        self.pool2 = nn.MaxPool2d(2)
        self.block3 = _conv_bn_relu(64, 128)
        self.pool3 = nn.AdaptiveAvgPool2d((7, 7))
        self.flatten = nn.Flatten(1)
        self.hidden = nn.Linear(128 * 7 * 7, 128)
        self.hidden_relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(128, num_classes)
        init_fan_out(self)
        self.feature_points = FeaturePoints(
            stages=("block1", "block2", "block3"),
            preact=(None, None, None),
            embedding="hidden_relu",
            has_stem=True,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.flatten(self.pool3(self.block3(x)))
        return self.fc(self.dropout(self.hidden_relu(self.hidden(x))))


@register_model("conv4mp")
def conv4mp(num_classes: int = 10, in_channels: int = 1, width: int = 64) -> Conv4MP:
    """Conv4-MP student (see :class:`Conv4MP`), width 64 by default."""
    return Conv4MP(num_classes=num_classes, in_channels=in_channels, width=width)


@register_model("conv4mp_w32")
def conv4mp_w32(num_classes: int = 10, in_channels: int = 1) -> Conv4MP:
    """Conv4-MP of width 32 (28,522 parameters for 1 channel and 10 classes): the demo student."""
    return Conv4MP(num_classes=num_classes, in_channels=in_channels, width=32)


@register_model("cnn_teacher")
def cnn_teacher(num_classes: int = 10, in_channels: int = 1, dropout: float = 0.3) -> CNNTeacher:
    """The cheap Fashion-MNIST teacher (see :class:`CNNTeacher`)."""
    return CNNTeacher(num_classes=num_classes, in_channels=in_channels, dropout=dropout)
