"""Build a network from a name: a zoo model or any ``package.module:factory``."""

from __future__ import annotations

import importlib
import inspect

import torch.nn as nn

from mimkd.errors import ModelError

from .registry import build_model, model_factory

__all__ = ["build_network"]


def build_network(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """A zoo model by name, or any model from ``package.module:factory``.

    A factory is called with those of ``num_classes=...`` and ``in_channels=...`` that its signature takes.
    An import failure or an exception inside the factory is a ModelError (one line, naming it).
    """
    if arch.startswith("timm:"):
        return _build_timm(arch, num_classes, in_channels)
    if ":" in arch:
        module_name, _, attr = arch.partition(":")
        try:
            module = importlib.import_module(module_name)
        except Exception as e:  # ImportError, or whatever the module raises while it is imported
            raise ModelError(
                f"model {arch!r}: cannot import module {module_name!r} ({type(e).__name__}: "
                f"{(str(e).strip().splitlines() or [''])[0][:200]}); check the name and PYTHONPATH"
            ) from None
        factory = getattr(module, attr, None)
        if factory is None:
            raise ModelError(f"model {arch!r}: module {module_name!r} has no attribute {attr!r}")
        net = _call_factory(arch, factory)(num_classes=num_classes, in_channels=in_channels)
        if not isinstance(net, nn.Module):
            raise ModelError(f"model {arch!r}: the factory returned {type(net).__name__}, not an nn.Module")
        return net
    model_factory(arch)  # raises a ModelError with suggestions for unknown names
    return build_model(arch, num_classes=num_classes, in_channels=in_channels)


def _call_factory(arch: str, factory):
    """``factory`` called with the keyword arguments its signature takes (num_classes, in_channels); any
    exception it raises becomes a ModelError naming it."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = None
    takes_any = params is None or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def call(**kwargs):
        accepted = kwargs if takes_any else {k: v for k, v in kwargs.items() if k in params}
        try:
            return factory(**accepted)
        except Exception as e:
            text = (str(e).strip().splitlines() or [""])[0][:240]
            raise ModelError(
                f"model {arch!r}: the factory raised {type(e).__name__}: {text} (it was called as "
                f"{arch.partition(':')[2]}({', '.join(f'{k}={v!r}' for k, v in accepted.items())})); fix the "
                "factory or choose another model"
            ) from None

    return call


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
