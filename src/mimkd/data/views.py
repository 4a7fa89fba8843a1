"""Extra augmented views of each training batch, for methods that ask for them (docs/architecture.md).

A method declares the views it needs by name in its capabilities (``Capabilities(views=("strong",))``). The
trainer builds each view's augmentation from the run's own training augmentation with :func:`build_views`
and the :class:`~mimkd.data.loader.BatchIterator` applies every view to the same raw images of a batch, each
with its own random stream (``mix_seed(seed, 2, i, epoch, step)`` for the ``i``-th view), on the device the
batch is built on. A batch's views are therefore, like its primary images, a pure function of
(seed, epoch, step): a resumed run sees the same views.

Views registered here:

``strong``
    The run's crop and flip (drawn independently of the primary view's), then RandAugment with two ops per
    image and Cutout (:mod:`mimkd.data.randaugment`), then normalisation: the strong view of MLKD's
    reference code (Jin et al., CVPR 2023; docs/methods/mlkd.md).

A new view is a function ``f(base_augment) -> augment`` registered with :func:`register_view`; the augment
it returns is anything :class:`~mimkd.data.loader.BatchIterator` accepts (an object with ``sample`` /
``apply``, which a data-parallel run slices per rank, or a callable ``f(uint8 images, generator)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from mimkd.errors import ConfigError

from .augment import AugmentParams, BatchAugment, normalize
from .randaugment import RandAugmentParams, apply_randaugment, sample_randaugment

__all__ = ["StrongAugment", "StrongParams", "VIEWS", "build_views", "register_view"]

ViewBuilder = Callable[[BatchAugment], Any]
VIEWS: dict[str, ViewBuilder] = {}


def register_view(name: str) -> Callable[[ViewBuilder], ViewBuilder]:
    """Register ``f(base_augment) -> augment`` as the view ``name``."""

    def deco(fn: ViewBuilder) -> ViewBuilder:
        if name in VIEWS:
            raise ValueError(f"view {name!r} is registered twice")
        VIEWS[name] = fn
        return fn

    return deco


def build_views(names: Sequence[str], base: BatchAugment) -> dict[str, Any]:
    """``{name: augment}`` for the views a method asks for, built from the run's training augmentation."""
    out = {}
    for name in names:
        if name not in VIEWS:
            raise ConfigError(f"unknown view {name!r}: the registered views are {', '.join(sorted(VIEWS))}")
        out[name] = VIEWS[name](base)
    return out


class StrongParams(NamedTuple):
    """The random parameters of a strong view: the crop/flip and the RandAugment draws."""

    base: AugmentParams
    rand: RandAugmentParams

    def take(self, start: int, stop: int) -> StrongParams:
        """The parameters of samples ``start:stop``."""
        return StrongParams(self.base.take(start, stop), self.rand.take(start, stop))


class StrongAugment:
    """The run's crop and flip, RandAugment (``num_ops`` ops per image) and Cutout, then normalisation.

    The crop and flip are drawn from the same generator before the RandAugment draws, so one generator
    fixes the whole view. Vectorised over the batch, on the images' device.
    """

    def __init__(self, base: BatchAugment, num_ops: int = 2) -> None:
        if num_ops < 0:
            raise ConfigError(f"RandAugment num_ops must be >= 0, got {num_ops}")
        self.base = base
        self.num_ops = int(num_ops)
        self.mean, self.std = base.mean, base.std

    def __repr__(self) -> str:
        return f"StrongAugment({self.base!r}, num_ops={self.num_ops})"

    def sample(self, n: int, image_hw: tuple[int, int], generator: torch.Generator | None) -> StrongParams:
        """Draw the parameters of ``n`` images of size ``image_hw`` (CPU tensors)."""
        base = self.base.sample(n, image_hw, generator)
        out_hw = (self.base.resized_crop,) * 2 if self.base.resized_crop else image_hw
        return StrongParams(base, sample_randaugment(n, out_hw, generator, self.num_ops))

    def apply(self, images: torch.Tensor, params: StrongParams) -> torch.Tensor:
        """Apply drawn parameters to uint8 ``images`` and normalise."""
        x = self.base.geometric(images, params.base)
        if x.is_floating_point():  # a resized crop leaves float values; RandAugment works on 8-bit levels
            x = x.round().clamp_(0, 255)
        x = apply_randaugment(x, params.rand)
        return normalize(x, self.mean, self.std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment and normalise a batch; random numbers from the CPU ``generator``."""
        return self.apply(images, self.sample(images.shape[0], tuple(images.shape[-2:]), generator))


@register_view("strong")
def _strong(base: BatchAugment) -> StrongAugment:
    return StrongAugment(base)
