"""Build a network from a name: a zoo model or any ``package.module:factory``."""

from __future__ import annotations

import importlib

import torch.nn as nn

from mimkd.errors import ModelError

from .registry import build_model, model_factory

__all__ = ["build_network"]


def build_network(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """A zoo model by name, or any model from ``package.module:factory``.

    A factory is called as ``factory(num_classes=..., in_channels=...)``, falling back to
    ``factory(num_classes=...)`` and ``factory()`` when it does not take those arguments.
    """
    if ":" in arch and not arch.startswith("timm:"):
        module_name, _, attr = arch.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ModelError(f"model {arch!r}: cannot import module {module_name!r} ({e})") from None
        factory = getattr(module, attr, None)
        if factory is None:
            raise ModelError(f"model {arch!r}: module {module_name!r} has no attribute {attr!r}")
        for kwargs in (
            {"num_classes": num_classes, "in_channels": in_channels},
            {"num_classes": num_classes},
            {},
        ):
            try:
                net = factory(**kwargs)
                break
            except TypeError:
                continue
        else:
            raise ModelError(f"model {arch!r}: could not call {attr}(num_classes=..., in_channels=...)")
        if not isinstance(net, nn.Module):
            raise ModelError(f"model {arch!r}: the factory returned {type(net).__name__}, not an nn.Module")
        return net
    model_factory(arch)  # raises a ModelError with suggestions for unknown names
    return build_model(arch, num_classes=num_classes, in_channels=in_channels)
