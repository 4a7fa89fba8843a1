"""Building blocks and weight initialisers shared by the zoo families.

Every block here is written so that the values a :class:`~mimkd.features.FeatureTap` captures stay valid
(the zoo's feature points): no in-place ReLU, out-of-place residual additions, and parameter-free
``nn.Identity`` modules named ``preact`` wherever a pre-activation value must be hookable. Parameter-free
modules do not appear in the ``state_dict``, so checkpoint layouts are unaffected.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = [
    "conv3x3",
    "conv1x1",
    "BasicBlock",
    "ChannelShuffle",
    "channel_shuffle",
    "init_fan_out",
]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block (two 3x3 convs) with an optional ``downsample`` shortcut.

    Layout and state-dict names are those of both RepDistiller's CIFAR ResNet and torchvision's ResNet-18/34:
    ``conv1, bn1, conv2, bn2, downsample.{0,1}``. ``preact`` outputs the residual sum before the final ReLU
    (RepDistiller's ``preact=True`` value for the last block of a stage).
    """

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.preact = nn.Identity()
        self.relu_out = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu_out(self.preact(out + identity))


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle: ``[N, g*c, H, W] -> view [N, g, c] -> transpose -> [N, c*g, H, W]``."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ChannelShuffle(nn.Module):
    """Module form of :func:`channel_shuffle` (parameter-free)."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


def init_fan_out(
    model: nn.Module, linear: str = "default", zero_conv_bias: bool = True, zero_linear_bias: bool = False
) -> None:
    """Initialise ``model`` the way the RepDistiller / torchvision zoo does.

    Convolutions: ``N(0, 2 / (k*k*out_channels))`` (He / Kaiming normal, ``fan_out`` mode, ReLU gain; conv
    biases zeroed when ``zero_conv_bias``). BatchNorm: weight 1, bias 0. Linear layers: ``"default"`` keeps
    PyTorch's init (optionally zeroing the bias), ``"normal"`` draws weights from ``N(0, 0.01)`` with a zero
    bias.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None and zero_conv_bias:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear == "normal":
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
            elif zero_linear_bias:
                nn.init.zeros_(m.bias)
