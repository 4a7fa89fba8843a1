"""Collectives of the memory bank and the negative sampler under ``torch.distributed`` (docs/methods/crd.md).

Without an initialised process group of several ranks every function returns its input unchanged.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_rows", "distributed_world", "gather_from_all_ranks", "mean_over_ranks"]


def distributed_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_gather_rows(x: Tensor, sizes: list[int]) -> Tensor:
    """Concatenate (in rank order) every rank's ``x`` (first dim = that rank's entry of ``sizes``)."""
    longest = max(sizes)
    if x.shape[0] < longest:
        x = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def gather_from_all_ranks(idx: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Under ``torch.distributed`` with world size > 1, every rank's ``(idx, z)`` concatenated in rank order.

    Ranks may hold different batch sizes (e.g. an incomplete last batch): sizes are exchanged first and the
    tensors padded to the largest. Without an initialised process group (or with one rank) the inputs are
    returned unchanged.
    """
    if distributed_world() == 1:
        return idx, z
    count = torch.tensor([idx.shape[0]], dtype=torch.long, device=idx.device)
    counts = [torch.empty_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    return all_gather_rows(idx, sizes), all_gather_rows(z, sizes)


def mean_over_ranks(x: Tensor, count: int) -> Tensor:
    """The mean of a per-rank mean ``x`` (of ``count`` samples) over all ranks' samples; ``x`` when single.

    Used for statistics a method fixes from its first batch (CRD's ``Z``), so that an N-process run fixes
    the value a 1-process run with the whole global batch would.
    """
    if distributed_world() == 1:
        return x
    pair = torch.stack([x.detach().double() * count, torch.tensor(float(count), device=x.device).double()])
    dist.all_reduce(pair)
    return (pair[0] / pair[1]).to(x.dtype)
