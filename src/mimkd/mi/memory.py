"""CRD's momentum memory bank and class-aware negative sampling (docs/methods/crd.md).

One :class:`MemoryBank` holds one side's embeddings (``M_s`` or ``M_t``) for every training sample; MIMKD's
global infoNCE term, CRD and WCoRD all read it. :class:`ClassAwareNegativeSampler` draws the bank indices an
anchor is scored against (CRD's ``mode='exact'``: the anchor itself, then K samples of other classes).

Speed and memory (``benchmarks/bench_memory_bank.py``, results in ``results/bench_memory_bank.md``):
one step costs O(B·K) time and memory in the sampler and O(B·D) in the update, whatever the bank size N;
the scores cost ``min(B·N·D, B·(K+1)·D)`` work as :func:`~mimkd.mi.bank_scores.choose_strategy` picks it,
in chunks of bounded memory (:mod:`mimkd.mi.bank_scores`).

* :meth:`MemoryBank.scores` never saves the bank for the backward pass, so :meth:`MemoryBank.update` writes
  its B rows in place (no N×D copy); the gradient is corrected for those rows from their old values.
* The sampler draws K of ~N negatives without replacement per anchor, vectorised over the batch, either by
  drawing with replacement and dropping repeats (a per-row sort finds them: O(B·K log K), cheap while K is a
  small fraction of the pool) or, when K is most of the pool (so N = O(K)), by keeping the K smallest of one
  random key per pool member; never by sorting or tabulating a ``B×N`` matrix.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mimkd.errors import MethodError

from .bank_scores import bank_scores, choose_strategy
from .ranks import gather_from_all_ranks, mean_over_ranks
from .sampler import TOPK_DRAW_RATIO, ClassAwareNegativeSampler

__all__ = [
    "TOPK_DRAW_RATIO",
    "ClassAwareNegativeSampler",
    "MemoryBank",
    "gather_from_all_ranks",
    "mean_over_ranks",
]


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
        self._logs: list = []  # weak references to the UpdateLogs of scores awaiting their backward

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

        ``strategy``: ``'rows'`` gathers each anchor's K+1 rows (CRD's algorithm); ``'full'`` computes
        ``z @ Mᵀ`` and picks columns; ``'auto'`` lets the cost model choose
        (:func:`~mimkd.mi.bank_scores.choose_strategy`). All give the same values (to float rounding);
        gradients flow to ``z`` only, and are those of the bank as it was when the scores were computed, even
        after :meth:`update` has overwritten rows in between.
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
            strategy = choose_strategy(
                self.num_samples, idx.shape[0], idx.shape[1] - 1, self.dim, memory.device.type
            )
        return bank_scores(memory, z, idx, strategy, self._logs)

    @torch.no_grad()
    def update(self, idx: Tensor, z: Tensor) -> None:
        """``M[i] ← normalise(m·M[i] + (1-m)·z_i)`` for the anchors ``idx`` (B,) with embeddings ``z`` (B×D).

        Touched rows become unit-norm. If an index occurs several times (e.g. a distributed
        sampler's padding), the last occurrence wins, deterministically. Under ``torch.distributed`` the
        update uses every rank's ``(idx, z)`` (see class docstring). The rows are written in place; scores
        computed before and not yet backpropagated get the rows' old values logged.
        """
        self._check(z, idx, "update", idx_dims=1)
        idx = idx.to(device=self.memory.device, dtype=torch.long)
        z = z.detach().to(device=self.memory.device, dtype=self.memory.dtype)
        idx, z = gather_from_all_ranks(idx, z)
        # one write per row, the value of its last occurrence: a stable sort puts each row's occurrences in
        # order, the last of each run is kept (O(B log B), no N-sized table)
        ordered, order = idx.sort(stable=True)
        last = torch.ones_like(ordered, dtype=torch.bool)
        last[:-1] = ordered[1:] != ordered[:-1]
        keep = order[last]
        idx, z = idx.index_select(0, keep), z.index_select(0, keep)
        old = self.memory.index_select(0, idx)
        new = F.normalize(self.momentum * old + (1.0 - self.momentum) * z, dim=1)
        logs = [log for ref in self._logs if (log := ref()) is not None]
        if logs:
            delta = old - new
            for log in logs:
                log.entries.append((idx, delta))
        self.memory.index_copy_(0, idx, new)
