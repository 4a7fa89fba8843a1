"""Class-balanced subsets (e.g. KDEP's "10% of images per class")."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mimkd.errors import DataError

__all__ = ["stratified_subset"]


def stratified_subset(
    labels: torch.Tensor | Sequence[int],
    fraction: float,
    seed: int = 0,
    *,
    classes: Sequence[str] | None = None,
) -> torch.Tensor:
    """Indices of a class-stratified random subset, sorted ascending.

    For each class present in ``labels``, ``round(fraction × count)`` indices (halves round up) are drawn
    without replacement by a :class:`torch.Generator` seeded with ``seed``; classes are visited in increasing
    label order, so the result depends only on ``labels``, ``fraction`` and ``seed``.

    Args:
        labels: 1-D integer labels.
        fraction: in (0, 1]; ``1.0`` returns every index.
        seed: seed of the generator.
        classes: optional class names, used in error messages.

    Raises:
        DataError: ``fraction`` outside (0, 1], or a class that would get no sample.
    """
    labels = torch.as_tensor(labels).cpu()
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise DataError(
            f"labels must be a 1-D integer tensor, got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if not (isinstance(fraction, int | float) and 0 < fraction <= 1):
        raise DataError(f"fraction must lie in (0, 1], got {fraction!r}")
    if fraction == 1:
        return torch.arange(len(labels), dtype=torch.int64)
    gen = torch.Generator().manual_seed(int(seed))
    chosen = []
    values, counts = torch.unique(labels, sorted=True, return_counts=True)
    for value, count in zip(values.tolist(), counts.tolist()):
        k = math.floor(fraction * count + 0.5)
        if k == 0:
            name = f" ({classes[value]!r})" if classes is not None and 0 <= value < len(classes) else ""
            raise DataError(
                f"stratified_subset: class {value}{name} has {count} sample(s); a fraction of {fraction} "
                "keeps none of them. Use a larger fraction."
            )
        members = (labels == value).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(count, generator=gen)[:k]])
    return torch.cat(chosen).sort().values
