"""Models the zoo does not know, importable as ``foreign_models:NAME`` by the CLI in the tests."""

from __future__ import annotations

import torch.nn as nn


def plain_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A plain CNN with no named stages and no declared feature points."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


class _Basic(nn.Module):
    """torchvision's BasicBlock layout: conv1/bn1/relu/conv2/bn2 (+ downsample), residual add, relu."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = (
            nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            if stride != 1 or c_in != c_out
            else None
        )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TVResNet(nn.Module):
    """A torchvision-style ResNet (conv1, bn1, relu, maxpool, layer1-4, avgpool, fc), written here, with
    in-place ReLUs as torchvision has them; small widths for CPU tests."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 16) -> None:
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()  # small images: no 4x stem reduction
        self.layer1 = _Basic(w[0], w[0], 1)
        self.layer2 = _Basic(w[0], w[1], 2)
        self.layer3 = _Basic(w[1], w[2], 2)
        self.layer4 = _Basic(w[2], w[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w[3], num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def tv_resnet(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return TVResNet(num_classes, in_channels)


class NaNEvery(nn.Module):
    """``plain_cnn`` whose logits are NaN on every ``period``-th training forward (a flaky loss source)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, period: int = 3) -> None:
        super().__init__()
        self.net = plain_cnn(num_classes, in_channels)
        self.period, self.calls = period, 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls % self.period == 0:
                return out * float("nan")
        return out


def nan_every_third(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return NaNEvery(num_classes, in_channels, period=3)
