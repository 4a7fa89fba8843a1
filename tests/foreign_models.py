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
