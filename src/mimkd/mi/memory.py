"""CRD's momentum memory bank and class-aware negative sampling (docs/methods/crd.md).

One :class:`MemoryBank` holds one side's embeddings (``M_s`` or ``M_t``) for every training sample; MIMKD's
global infoNCE term, CRD and WCoRD all read it. :class:`ClassAwareNegativeSampler` draws the bank indices an
anchor is scored against (CRD's ``mode='exact'``: the anchor itself, then K samples of other classes).

Speed notes (measured in ``benchmarks/bench_memory_bank.py``, results in ``results/bench_memory_bank.md``):

* :meth:`MemoryBank.scores` needs ``<z_b, M[idx[b, j]]>`` for ``B×(K+1)`` indices. The reference
  implementation gathers ``B×(K+1)×D`` rows (64×16385×128 floats ≈ 0.5 GB written, read, and kept alive for
  the backward). When ``B·(K+1)`` is large relative to ``N`` it is much cheaper to compute all ``B×N`` scores
  ``z @ Mᵀ`` (one read of the bank, one GEMM) and pick the needed columns with :func:`torch.gather`.
* The sampler draws K of ~N negatives without replacement per anchor, vectorised over the batch, either by
  drawing with replacement and dropping repeats (cheap while K is a small fraction of the pool) or by keeping
  the K smallest of one random key per pool member; never by sorting a ``B×N`` matrix.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from mimkd.errors import MethodError, MimkdWarning

__all__ = [
    "FULL_MATRIX_RATIO",
    "TOPK_DRAW_RATIO",
    "ClassAwareNegativeSampler",
    "MemoryBank",
    "gather_from_all_ranks",
    "mean_over_ranks",
]

FULL_MATRIX_RATIO = 1.25
"""``MemoryBank.scores(strategy='auto')`` computes the full ``B×N`` score matrix when ``B·(K+1) >= ratio·N``.

The two strategies were measured to tie around ``B·(K+1)/N ≈ 1–1.4``, the full matrix winning clearly above
it (timings: results/dev_cpu_notes.md, ``results/bench_memory_bank.md``)."""


def _distributed_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_gather_rows(x: Tensor, sizes: list[int]) -> Tensor:
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
    if _distributed_world() == 1:
        return idx, z
    count = torch.tensor([idx.shape[0]], dtype=torch.long, device=idx.device)
    counts = [torch.empty_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    return _all_gather_rows(idx, sizes), _all_gather_rows(z, sizes)


def mean_over_ranks(x: Tensor, count: int) -> Tensor:
    """The mean of a per-rank mean ``x`` (of ``count`` samples) over all ranks' samples; ``x`` when single.

    Used for statistics a method fixes from its first batch (CRD's ``Z``), so that an N-process run fixes
    the value a 1-process run with the whole global batch would.
    """
    if _distributed_world() == 1:
        return x
    pair = torch.stack([x.detach().double() * count, torch.tensor(float(count), device=x.device).double()])
    dist.all_reduce(pair)
    return (pair[0] / pair[1]).to(x.dtype)


TOPK_DRAW_RATIO = 0.85
"""``ClassAwareNegativeSampler`` switches from drawing-and-dropping-repeats to top-K of random keys when the
draws needed for K distinct negatives exceed this fraction of the pool (measured crossover ≈ 0.7–1.1, i.e.
K ≈ 50–65% of the pool; both CRD's K = 16384 and MIMKD's K = 4096 of ~49500 use the draws)."""


class MemoryBank(nn.Module):
    """CRD's momentum memory bank (docs/methods/crd.md): one ``D``-dim embedding per training sample.

    The ``N×D`` table is the buffer ``memory`` (saved in the state_dict, moved by ``.to()``, never trained),
    initialised i.i.d. uniform in ``[-a, a]`` with ``a = 1/sqrt(D/3)`` (rows not normalised). Rows are read
    detached: gradients flow only into the query embeddings ``z``.

    Distributed training: :meth:`update` all-gathers ``idx`` and ``z`` from every rank (when
    ``torch.distributed`` is initialised with world size > 1) and applies the same update everywhere, so all
    ranks' banks stay identical without ever broadcasting the bank. :meth:`scores` reads the local copy and
    needs no communication.
    """

    memory: Tensor

    def __init__(
        self,
        num_samples: int,
        dim: int = 128,
        momentum: float = 0.5,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        for key, value in (("num_samples", num_samples), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MethodError(f"{name}: {key} must be a positive int, got {value!r}")
        if not 0.0 <= momentum < 1.0:
            raise MethodError(f"{name}: momentum must be in [0, 1) (CRD uses 0.5), got {momentum!r}")
        self.momentum = float(momentum)
        bound = 1.0 / math.sqrt(dim / 3.0)
        memory = torch.rand(num_samples, dim, generator=generator) * (2.0 * bound) - bound
        self.register_buffer("memory", memory)
        self._saved_for_backward = False

    @property
    def num_samples(self) -> int:
        return self.memory.shape[0]

    @property
    def dim(self) -> int:
        return self.memory.shape[1]

    def extra_repr(self) -> str:
        return f"num_samples={self.num_samples}, dim={self.dim}, momentum={self.momentum}"

    def ddp_local_buffers(self) -> list[str]:
        """Buffers DistributedDataParallel must not broadcast: every rank updates its bank identically
        (:meth:`update` all-gathers), so a broadcast would only cost bandwidth."""
        return [n for n, _ in self.named_buffers(recurse=False)]

    def rows(self, idx: Tensor) -> Tensor:
        """The stored rows ``M[idx]`` (detached), shape ``idx.shape + (D,)``."""
        idx = idx.to(self.memory.device)
        return self.memory.index_select(0, idx.reshape(-1)).view(*idx.shape, self.dim)

    def _check(self, z: Tensor, idx: Tensor, fn: str, idx_dims: int) -> None:
        name = f"{type(self).__name__}.{fn}"
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != self.dim:
            raise MethodError(
                f"{name}: z must have shape B×{self.dim}, "
                f"got {tuple(z.shape) if isinstance(z, Tensor) else z!r}"
            )
        if (
            not isinstance(idx, Tensor)
            or idx.dtype not in (torch.int64, torch.int32)
            or idx.dim() != idx_dims
        ):
            want = "B×(K+1)" if idx_dims == 2 else "(B,)"
            raise MethodError(
                f"{name}: idx must be an integer tensor of shape {want}, got "
                f"{(idx.dtype, tuple(idx.shape)) if isinstance(idx, Tensor) else idx!r}"
            )
        if idx.shape[0] != z.shape[0]:
            raise MethodError(f"{name}: idx has {idx.shape[0]} rows but z has {z.shape[0]}")

    def scores(self, z: Tensor, idx: Tensor, strategy: str = "auto") -> Tensor:
        """``out[b, j] = <z_b, M[idx[b, j]]>`` for ``z`` (B×D) and ``idx`` (B×(K+1)); no temperature.

        ``strategy``: ``'rows'`` gathers the ``B×(K+1)×D`` rows and runs a batched matrix-vector product (the
        reference implementation); ``'full'`` computes ``z @ Mᵀ`` (B×N) and gathers columns; ``'auto'`` picks
        ``'full'`` when ``B·(K+1) >= FULL_MATRIX_RATIO·N``. All give the same values (to float rounding) and
        gradients flow to ``z`` only.
        """
        self._check(z, idx, "scores", idx_dims=2)
        if strategy not in ("auto", "rows", "full"):
            raise MethodError(
                f"MemoryBank.scores: strategy must be 'auto', 'rows' or 'full', got {strategy!r}"
            )
        memory = self.memory
        z = z.to(memory.dtype)
        idx = idx.to(device=memory.device, dtype=torch.long)
        if strategy == "auto":
            strategy = "full" if idx.numel() >= FULL_MATRIX_RATIO * self.num_samples else "rows"
        if strategy == "full":
            if torch.is_grad_enabled() and z.requires_grad:
                # mm saves the bank for its backward: the next update must not write into it (see update)
                self._saved_for_backward = True
            return torch.mm(z, memory.t()).gather(1, idx)
        gathered = memory.index_select(0, idx.reshape(-1)).view(*idx.shape, self.dim)
        return torch.bmm(gathered, z.unsqueeze(2)).squeeze(2)

    @torch.no_grad()
    def update(self, idx: Tensor, z: Tensor) -> None:
        """``M[i] ← normalise(m·M[i] + (1-m)·z_i)`` for the anchors ``idx`` (B,) with embeddings ``z`` (B×D).

        Touched rows become unit-norm. If an index occurs several times (e.g. a distributed
        sampler's padding), the last occurrence wins, deterministically. Under ``torch.distributed`` the
        update uses every rank's ``(idx, z)`` (see class docstring).
        """
        self._check(z, idx, "update", idx_dims=1)
        idx = idx.to(device=self.memory.device, dtype=torch.long)
        z = z.detach().to(device=self.memory.device, dtype=self.memory.dtype)
        idx, z = gather_from_all_ranks(idx, z)
        # Make every write to a row carry the same value (that of the row's last occurrence), so the result
        # does not depend on the order in which index_copy_ applies duplicate writes.
        position = torch.arange(idx.numel(), device=idx.device)
        last = torch.full((self.num_samples,), -1, dtype=torch.long, device=idx.device)
        last.scatter_reduce_(0, idx, position, reduce="amax")
        z = z.index_select(0, last.index_select(0, idx))
        new = self.momentum * self.memory.index_select(0, idx) + (1.0 - self.momentum) * z
        if self._saved_for_backward:
            # The full-matrix scores of this step still need the old bank in their backward pass, and the
            # update comes before it (inside the forward, as CRD does): write into a copy (one N×D memcpy,
            # far cheaper than the B×(K+1)×D gather it replaces).
            self.memory = self.memory.clone()
            self._saved_for_backward = False
        self.memory.index_copy_(0, idx, F.normalize(new, dim=1))


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
            across_ranks = _distributed_world() > 1
        if across_ranks and _distributed_world() > 1:
            count = torch.tensor([index.numel()], dtype=torch.long, device=index.device)
            counts = [torch.empty_like(count) for _ in range(dist.get_world_size())]
            dist.all_gather(counts, count)
            sizes = [int(c.item()) for c in counts]
            every = _all_gather_rows(index.long(), sizes)
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
            step = torch.arange(length, dtype=torch.int32, device=device).expand(batch, length)
            first = torch.full((batch, self.max_pool), length, dtype=torch.int32, device=device)
            first.scatter_reduce_(1, stream, step, reduce="amin")
            keep = first.gather(1, stream) == step
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
