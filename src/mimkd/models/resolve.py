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
    if arch.startswith("timm:"):
        return _build_timm(arch, num_classes, in_channels)
    if ":" in arch:
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


def _build_timm(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """``timm:NAME`` — a timm model (optional; timm needs a working torchvision), randomly initialised."""
    name = arch.partition(":")[2]
    try:
        import timm
    except Exception as e:  # ImportError, or torchvision's "operator torchvision::nms does not exist"
        raise ModelError(
            f"model {arch!r}: timm cannot be imported here ({type(e).__name__}: {str(e)[:160]}). timm "
            "needs torchvision built for this torch: pip install timm torchvision (matching versions), or "
            "use a zoo model or package.module:factory"
        ) from None
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    except RuntimeError as e:  # timm's unknown-model error
        close = timm.list_models(f"*{name[:4]}*")[:8] if name else []
        hint = f" Close names: {', '.join(close)}." if close else ""
        raise ModelError(f"model {arch!r}: {e}.{hint}") from None
