"""Class-aware negative sampling for memory-bank contrast (CRD's ``mode='exact'``, docs/methods/crd.md).

:class:`ClassAwareNegativeSampler` draws the bank indices an anchor is scored against: the anchor itself,
then K samples of other classes, without replacement, in O(B·K) time and memory per call whatever the
training-set size N (timings: ``results/bench_memory_bank.md``).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import Tensor

from mimkd.errors import MethodError, MimkdWarning

from .ranks import all_gather_rows, distributed_world

__all__ = ["TOPK_DRAW_RATIO", "ClassAwareNegativeSampler"]


TOPK_DRAW_RATIO = 0.85
"""``ClassAwareNegativeSampler`` switches from drawing-and-dropping-repeats to top-K of random keys when the
draws needed for K distinct negatives exceed this fraction of the pool (measured crossover ≈ 0.7–1.1, i.e.
K ≈ 50–65% of the pool; both CRD's K = 16384 and MIMKD's K = 4096 of ~49500 use the draws)."""


class ClassAwareNegativeSampler:
    """Bank indices for CRD's ``mode='exact'`` (docs/methods/crd.md): ``[anchor, K other-class negatives]``.

    ``labels``: the class of every training sample (LongTensor ``(N,)``, any integer values). For each anchor
    the K negatives are drawn uniformly *without* replacement from the samples whose class differs from the
    anchor's; anchors whose pool is smaller than K draw with replacement (a warning is issued once, at
    construction). Column 0 is the anchor's own index (the positive).

    ``method``: ``'draw'`` draws i.i.d. positions and drops repeats (cost grows with K), ``'topk'`` keeps the
    K smallest of one random key per pool member (cost grows with N); both are exact and fully vectorised over
    the batch. ``'auto'`` (default) uses ``'topk'`` when the expected number of draws exceeds
    ``TOPK_DRAW_RATIO`` times the pool size (measured crossover).

    Sampling runs on the generator's device when a generator is given (e.g. a seeded CPU generator for
    reproducibility), otherwise on the labels' device; the result is returned on the labels' device.

    Under ``torch.distributed`` (world size > 1) :meth:`sample` gathers every rank's anchors, draws the
    negatives of the whole global batch and returns this rank's rows. With the same RNG state on every rank
    (the trainer seeds all ranks alike and every rank consumes the same draws) all ranks draw the same
    numbers, so each anchor gets the negatives it would get in a 1-process run with the global batch, and
    the ranks' choices are consistent with each other. The cost is sampling ``world_size`` times more rows.
    """

    def __init__(self, labels: Tensor, num_negatives: int, method: str = "auto") -> None:
        name = type(self).__name__
        if method not in ("auto", "draw", "topk"):
            raise MethodError(f"{name}: method must be 'auto', 'draw' or 'topk', got {method!r}")
        if (
            not isinstance(labels, Tensor)
            or labels.dim() != 1
            or labels.is_floating_point()
            or labels.numel() < 2
        ):
            raise MethodError(
                f"{name}: labels must be a 1-D integer tensor with one class per training sample"
            )
        if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 1:
            raise MethodError(f"{name}: num_negatives must be a positive int, got {num_negatives!r}")
        self.labels = labels.long()
        self.num_negatives = num_negatives
        classes, class_of = torch.unique(self.labels.cpu(), return_inverse=True)
        if classes.numel() < 2:
            raise MethodError(f"{name}: every sample has the same class, so no anchor has a negative")
        counts = torch.bincount(class_of, minlength=classes.numel())
        n = self.labels.numel()
        # Samples sorted by class: class c occupies order[start[c] : start[c] + counts[c]]; the other-class
        # pool of c is order with that block cut out, so pool position p maps to order[p + counts[c]·(p >=
        # start[c])].
        self._cpu_tables = (
            class_of,
            torch.argsort(class_of, stable=True),
            counts.cumsum(0) - counts,
            counts,
        )
        self._tables: dict[torch.device, tuple[Tensor, ...]] = {}
        pools = n - counts
        self.max_pool = int(pools.max())
        small = pools < num_negatives
        self.with_replacement = bool(small.any())
        if self.with_replacement:
            warnings.warn(
                f"{name}: num_negatives={num_negatives} exceeds the number of other-class samples for "
                f"{int(small.sum())} of {classes.numel()} classes (smallest pool {int(pools.min())}); their "
                "negatives are drawn with replacement",
                MimkdWarning,
                stacklevel=2,
            )
        self._equal_pools = bool((pools == self.max_pool).all())
        exact_pools = pools[~small]
        # Number of i.i.d. draws that yields K distinct pool positions for every row (coupon collector): mean
        # + 6 std for the worst (smallest) pool, so a second round is rarely needed.
        self._draws = self._draws_needed(int(exact_pools.min()), num_negatives) if len(exact_pools) else 0
        if method == "auto":
            method = "topk" if self._draws > TOPK_DRAW_RATIO * self.max_pool else "draw"
        self.method = method

    @staticmethod
    def _draws_needed(pool: int, k: int) -> int:
        p = (pool - torch.arange(k, dtype=torch.float64)) / pool  # probability that draw i+1 is new
        mean = float((1.0 / p).sum())
        std = math.sqrt(float(((1.0 - p) / p**2).sum()))
        return math.ceil(mean + 6.0 * std) + 16

    def _tables_on(self, device: torch.device) -> tuple[Tensor, ...]:
        if device not in self._tables:
            self._tables[device] = tuple(t.to(device) for t in self._cpu_tables)
        return self._tables[device]

    def sample(
        self, index: Tensor, generator: torch.Generator | None = None, *, across_ranks: bool | None = None
    ) -> Tensor:
        """``(B, K+1)`` LongTensor: column 0 = ``index``, columns 1..K = negatives of other classes.

        ``across_ranks`` (default: whenever a process group of several ranks is initialised) draws for the
        global batch and returns this rank's rows (class docstring); every rank must then call it together.
        """
        name = f"{type(self).__name__}.sample"
        if not isinstance(index, Tensor) or index.dim() != 1 or index.is_floating_point():
            raise MethodError(f"{name}: index must be a 1-D integer tensor of dataset indices")
        if across_ranks is None:
            across_ranks = distributed_world() > 1
        if across_ranks and distributed_world() > 1:
            count = torch.tensor([index.numel()], dtype=torch.long, device=index.device)
            counts = [torch.empty_like(count) for _ in range(dist.get_world_size())]
            dist.all_gather(counts, count)
            sizes = [int(c.item()) for c in counts]
            every = all_gather_rows(index.long(), sizes)
            start = sum(sizes[: dist.get_rank()])
            return self.sample(every, generator, across_ranks=False)[start : start + index.numel()]
        n = self.labels.numel()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise MethodError(f"{name}: index values must lie in [0, {n}) (the dataset size given by labels)")
        device = generator.device if generator is not None else self.labels.device
        class_of, order, start, counts = self._tables_on(device)
        anchor = index.to(device=device, dtype=torch.long)
        cls = class_of[anchor]
        pool = n - counts[cls]  # (B,)
        positions = self._draw_positions(pool, generator)
        shift = (positions >= start[cls].unsqueeze(1)).long() * counts[cls].unsqueeze(1)
        negatives = order[positions + shift]
        out = torch.cat([anchor.unsqueeze(1), negatives], dim=1)
        return out.to(self.labels.device)

    def _draw_positions(self, pool: Tensor, generator: torch.Generator | None) -> Tensor:
        """K positions per row, uniform in ``[0, pool_b)``, distinct unless ``pool_b < K``.

        Stream of i.i.d. uniform draws per row; keep each value's first occurrence and stop at K kept values:
        sequential rejection of repeats, i.e. exact sampling without replacement (the kept set is a uniform
        K-subset, in uniformly random order). Rows whose pool is smaller than K keep every draw. When K is a
        large fraction of the pool, repeats make the stream long and :meth:`_topk_positions` is faster.
        """
        k, batch, device = self.num_negatives, pool.numel(), pool.device
        replace = (pool < k).unsqueeze(1)
        if self.method == "topk":
            return self._topk_positions(pool, replace, generator)
        budget = max(self._draws, k)
        stream = torch.empty(batch, 0, dtype=torch.long, device=device)
        while True:
            shape = (batch, budget - stream.shape[1])
            if self._equal_pools:  # every row's pool has max_pool elements: draw positions directly
                fresh = torch.randint(0, self.max_pool, shape, generator=generator, device=device)
            else:  # 62-bit draws modulo each row's pool size: bias below 1e-13
                fresh = torch.randint(0, 2**62, shape, generator=generator, device=device) % pool.unsqueeze(1)
            stream = torch.cat([stream, fresh], dim=1)
            length = stream.shape[1]
            keep = first_occurrences(stream, self.max_pool)
            if self.with_replacement:
                keep |= replace
            rank = keep.cumsum(1, dtype=torch.int32)
            if bool((rank[:, -1] >= k).all()):
                # the kept draws of rank 1..K go to columns 0..K-1; everything else to a discarded column K
                column = torch.where(keep & (rank <= k), rank - 1, k).long()
                out = torch.empty(batch, k + 1, dtype=torch.long, device=device)
                return out.scatter_(1, column, stream)[:, :k]
            budget = length + max(64, length // 8)

    def _topk_positions(self, pool: Tensor, replace: Tensor, generator: torch.Generator | None) -> Tensor:
        """Same distribution as :meth:`_draw_positions`: the K smallest of ``max_pool`` random keys per row.

        Used when K is close to the pool size (the draw-and-drop-repeats stream would be long). Keys are
        62-bit integers, so ties (which would bias the choice) have negligible probability.
        """
        k, batch, device = self.num_negatives, pool.numel(), pool.device
        if k > self.max_pool:  # every pool is smaller than K: all rows draw with replacement
            return torch.randint(0, 2**62, (batch, k), generator=generator, device=device) % pool.unsqueeze(1)
        keys = torch.randint(0, 2**62, (batch, self.max_pool), generator=generator, device=device)
        columns = torch.arange(self.max_pool, device=device)
        keys.masked_fill_(columns >= pool.unsqueeze(1), 2**62)  # outside this row's pool: never chosen
        positions = keys.topk(k, dim=1, largest=False, sorted=False).indices
        if self.with_replacement:
            drawn = torch.randint(0, 2**62, (batch, k), generator=generator, device=device) % pool.unsqueeze(
                1
            )
            positions = torch.where(replace, drawn, positions)
        return positions


TABLE_ENTRIES = 2**24
"""Rows × pool size up to which :func:`first_occurrences` tabulates (a 64 MB int32 table: at CIFAR-100 size
it is faster than sorting on a CPU); above it, it sorts, in O(B·L log L) time and O(B·L) memory."""


def first_occurrences(stream: Tensor, pool: int) -> Tensor:
    """``keep[b, i]``: ``stream[b, i]`` (a value in ``[0, pool)``) occurs nowhere before position ``i`` in
    its row; ``stream`` is B×L. Either way exact, with identical results.

    Small ``B·pool``: a table of each value's first position (``scatter_reduce`` min). Otherwise a stable sort
    of each row groups equal values with their positions in increasing order, the first of each group being
    the first occurrence — memory and time independent of ``pool``.
    """
    batch, length = stream.shape
    if batch * pool <= TABLE_ENTRIES:
        step = torch.arange(length, dtype=torch.int32, device=stream.device).expand(batch, length)
        first = torch.full((batch, pool), length, dtype=torch.int32, device=stream.device)
        first.scatter_reduce_(1, stream, step, reduce="amin")
        return first.gather(1, stream) == step
    ordered, order = stream.sort(dim=1, stable=True)
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    return torch.empty_like(first).scatter_(1, order, first)
