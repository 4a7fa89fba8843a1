"""Negative pairs inside a mini-batch (docs/mimkd.md).

MIMKD's JSD terms use exactly one negative per positive: the student tensor of image ``b`` paired with the
teacher tensor of image ``perm[b]``, where ``perm`` is a derangement (a permutation without fixed points), so
every student tensor appears in one positive and one negative pair. Deep InfoMax's all-pairs alternative
(every other image of the batch is a negative) is :func:`all_pairs_negatives`.

All functions draw on the CPU (or on the generator's device when a generator is given) and return the
result on ``device``; a batch needs at least 2 images.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mimkd.errors import MethodError

__all__ = ["all_pairs_negatives", "derangement", "roll_derangement"]


def _check_batch(batch_size: int, fn: str) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise MethodError(f"{fn}: batch_size must be an int, got {batch_size!r}")
    if batch_size < 2:
        raise MethodError(
            f"a batch of {batch_size} image has no negative pair ({fn} pairs each image with another image "
            "of its batch, so it needs a batch of at least 2): use --batch-size 2 or more "
            "(optim.batch_size in a config)"
        )
    return batch_size


def _draw_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def derangement(
    batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """A uniformly random permutation of ``range(batch_size)`` with no fixed point (``perm[b] != b``).

    Rejection sampling: draw uniform permutations until one has no fixed point (about e ≈ 2.7 draws on
    average, whatever the batch size), which keeps the result uniform over all derangements.
    Returns a LongTensor of shape ``(batch_size,)`` on ``device`` (default: CPU).
    """
    n = _check_batch(batch_size, "derangement")
    draw_on = _draw_device(generator)
    identity = torch.arange(n, device=draw_on)
    while True:
        perm = torch.randperm(n, generator=generator, device=draw_on)
        if not bool((perm == identity).any()):
            return perm.to(device) if device is not None else perm


def roll_derangement(
    batch_size: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> Tensor:
    """``perm[b] = (b + r) mod B`` with a random offset ``r`` uniform in ``[1, B-1]`` (a cheap alternative).

    A derangement, but not a uniformly random one: only ``B-1`` of them are reachable.
    """
    n = _check_batch(batch_size, "roll_derangement")
    draw_on = _draw_device(generator)
    offset = torch.randint(1, n, (1,), generator=generator, device=draw_on)
    perm = (torch.arange(n, device=draw_on) + offset) % n
    return perm.to(device) if device is not None else perm


def all_pairs_negatives(batch_size: int, device: torch.device | str | None = None) -> Tensor:
    """Deep InfoMax's all-pairs negatives: a ``(B, B-1)`` LongTensor whose row ``b`` lists every ``j != b``.

    Deterministic; row ``b`` is ``[0, ..., b-1, b+1, ..., B-1]``. Pass it as ``perm`` to the critics'
    ``pair_scores`` to score every (teacher ``j``, student ``b``) pair with ``j != b``.
    """
    n = _check_batch(batch_size, "all_pairs_negatives")
    cols = torch.arange(n - 1, device=device)
    rows = torch.arange(n, device=device).unsqueeze(1)
    return cols.unsqueeze(0) + (cols.unsqueeze(0) >= rows).long()
