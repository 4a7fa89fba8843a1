"""Model registry and the feature points every zoo model declares.

A zoo model is registered with :func:`register_model` and built with :func:`build_model`. Each zoo model class
carries a ``feature_points`` attribute (:class:`FeaturePoints`) naming, by module path, the hook points that
reproduce the RepDistiller feature list (docs/methods): the stem and stage outputs (``feat[:-1]``), their
pre-activation variants (``preact=True``), and the pre-classifier embedding (``feat[-1]``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from mimkd.errors import ModelError, unknown_name_error

__all__ = ["FeaturePoints", "register_model", "build_model", "available", "model_factory"]


@dataclass(frozen=True)
class FeaturePoints:
    """Named hook points of a model (see :class:`mimkd.features.FeatureTap` for the point syntax).

    A point is a module path (``"layer1"``: the module's output) or ``"path:input"`` (the first positional
    input of the module, e.g. ``"fc:input"`` for the pooled vector fed to the classifier).

    Attributes:
        stages: RepDistiller's ``feat[:-1]``: the stem first (when ``has_stem``), then each stage output,
            post-activation, in forward order.
        preact: pre-activation counterparts of ``stages`` (``None`` where the network has none); same length.
        embedding: the pre-classifier vector, RepDistiller's ``feat[-1]``.
        has_stem: whether ``stages[0]`` is a stem (excluded from ``feat[1:-1]``, the maps most methods use).
    """

    stages: tuple[str, ...]
    preact: tuple[str | None, ...]
    embedding: str
    has_stem: bool = True

    def __post_init__(self) -> None:
        if len(self.preact) != len(self.stages):
            raise ValueError("preact must have one entry per stage")

    @property
    def maps(self) -> tuple[str, ...]:
        """Stage outputs without the stem (RepDistiller's ``feat[1:-1]``)."""
        return self.stages[1:] if self.has_stem else self.stages


_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register a factory ``f(num_classes=..., in_channels=..., **kw) -> nn.Module`` under ``name``."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    """Names of every registered zoo model."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def model_factory(name: str) -> Callable[..., nn.Module]:
    _ensure_loaded()
    if name not in _REGISTRY:
        raise unknown_name_error("model", name, _REGISTRY, ModelError)
    return _REGISTRY[name]


def build_model(name: str, num_classes: int = 100, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build the zoo model ``name`` for ``num_classes`` classes and ``in_channels`` input channels."""
    if num_classes < 1:
        raise ModelError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ModelError(f"in_channels must be >= 1, got {in_channels}")
    return model_factory(name)(num_classes=num_classes, in_channels=in_channels, **kwargs)


def _ensure_loaded() -> None:
    # Importing the package registers every family.
    import mimkd.models  # noqa: F401
