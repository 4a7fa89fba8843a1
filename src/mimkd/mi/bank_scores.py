"""Scores of queries against memory-bank rows, and the cost model that picks how (docs/methods/crd.md).

``scores[b, j] = <z_b, M[idx[b, j]]>`` for ``z`` (B×D), ``idx`` (B×(K+1)) and a bank ``M`` (N×D). Two exact
forward passes, both chunked over the batch so that their temporaries stay bounded whatever N, B and K:

* ``'rows'`` gathers the K+1 rows of one anchor (or a few) at a time and takes dot products (CRD's
  algorithm, cache-sized); cost ∝ ``B·(K+1)·D`` random reads.
* ``'full'`` computes ``z @ Mᵀ`` (B×N) and picks the needed columns; cost ∝ ``B·N·D`` FLOPs.

The backward pass is the same for both: ``∂/∂z_b = Σ_j g[b, j]·M[idx[b, j]]``, a weighted sum of rows per
anchor. It reads the bank as it is at backward time and corrects the rows that :meth:`MemoryBank.update`
overwrote in between (CRD updates the bank inside the forward) from an :class:`UpdateLog` of their old
values. So nothing keeps the bank alive for the backward, the update writes its B rows in place
(``index_copy_``) and the N×D bank is never copied.

:func:`choose_strategy` compares the two forward costs with the constants in :data:`COSTS`, fitted to
timings on a 2-core CPU (``benchmarks/bench_memory_bank.py``, ``results/bench_memory_bank.md``). The choice
is a fixed function of (N, B, K, D, device type), never of a timing taken at run time, so a seed still fixes
a run.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["COSTS", "BankCost", "UpdateLog", "bank_scores", "choose_strategy", "estimate_seconds"]

FULL_CHUNK_BYTES = 64 * 2**20  # the largest B_chunk×N score block of the 'full' path
ROWS_CHUNK_BYTES = 2**20  # the largest B_chunk×(K+1)×D block of gathered rows of the 'rows' path


@dataclass(frozen=True)
class BankCost:
    """Seconds per unit of each path's forward work, fitted per device type (the backward pass is the same
    for both paths, a weighted sum of the K+1 rows of each anchor, so it does not enter the choice).

    ``full_per_score``: per entry of the B×N score matrix at D = 128 (the GEMM; taken ∝ D);
    ``rows_per_value``: per gathered float of the ``B×(K+1)×D`` rows.
    """

    full_per_score: float
    rows_per_value: float
    measured: bool = True


COSTS: dict[str, BankCost] = {
    # fitted on the project's 2-core CPU, 2 threads: the medians over the 12-point grid of
    # results/bench_memory_bank.md (`full` when N < 27.3·(K+1))
    "cpu": BankCost(full_per_score=7.5e-9, rows_per_value=1.6e-9),
    # not measured: a GPU's GEMM is ~100x and its gathers ~30x the CPU's (the prepared GPU check,
    # benchmarks/gpu_check.sh, measures both paths at 1.28M rows)
    "cuda": BankCost(full_per_score=7.5e-11, rows_per_value=5.3e-11, measured=False),
}


def estimate_seconds(n: int, batch: int, k: int, dim: int, strategy: str, device: str = "cpu") -> float:
    """The cost model's seconds for the forward pass of ``strategy`` at bank size ``n``."""
    c = COSTS.get(device, COSTS["cpu"])
    if strategy == "full":
        return batch * n * c.full_per_score * dim / 128.0
    return batch * (k + 1) * dim * c.rows_per_value


def choose_strategy(n: int, batch: int, k: int, dim: int, device: str = "cpu") -> str:
    """``'full'`` or ``'rows'``, whichever :func:`estimate_seconds` says is cheaper (``'rows'`` on a tie).

    Both costs are proportional to the batch, so the choice is ``'full'`` exactly when ``N`` is below
    ``(K+1)·D·rows_per_value / (full_per_score·D/128)``.
    """
    full = estimate_seconds(n, batch, k, dim, "full", device)
    return "full" if full < estimate_seconds(n, batch, k, dim, "rows", device) else "rows"


class UpdateLog:
    """Rows of a bank overwritten after a score was computed from it, as ``(rows, old - new)`` pairs."""

    __slots__ = ("entries", "__weakref__")

    def __init__(self) -> None:
        self.entries: list[tuple[Tensor, Tensor]] = []


def _forward(memory: Tensor, z: Tensor, idx: Tensor, strategy: str) -> Tensor:
    """The scores, in chunks of anchors: each chunk's B_c×N scores (``'full'``) or B_c×(K+1)×D rows
    (``'rows'``) stay under :data:`FULL_CHUNK_BYTES` / :data:`ROWS_CHUNK_BYTES` (cache-sized: gathering one
    anchor's rows at a time was measured 2–10× faster than gathering the batch's)."""
    out = z.new_empty(idx.shape)
    b, n, d = idx.shape[0], memory.shape[0], memory.shape[1]
    if strategy == "full":
        step = max(1, FULL_CHUNK_BYTES // (4 * n))
    else:
        step = max(1, ROWS_CHUNK_BYTES // (4 * idx.shape[1] * d))
    for lo in range(0, b, step):
        zc, ic = z[lo : lo + step], idx[lo : lo + step]
        if strategy == "full":
            out[lo : lo + step] = torch.mm(zc, memory.t()).gather(1, ic)
        else:
            rows = memory.index_select(0, ic.reshape(-1)).view(*ic.shape, d)
            out[lo : lo + step] = torch.bmm(rows, zc.unsqueeze(2)).squeeze(2)
    return out


def _backward(memory: Tensor, g: Tensor, idx: Tensor) -> Tensor:
    """``Σ_j g[b, j]·M[idx[b, j]]`` for every anchor ``b`` (B×D), the same for both paths: a weighted sum of
    bank rows per anchor (``embedding_bag``), which never materialises the B×(K+1)×D rows."""
    return F.embedding_bag(idx, memory, per_sample_weights=g.to(memory.dtype), mode="sum")


def _correction(g: Tensor, idx: Tensor, rows: Tensor, delta: Tensor) -> Tensor:
    """``Σ_j g[b, j]·delta[r]`` over the ``(b, j)`` whose ``idx[b, j]`` is the updated row ``rows[r]``."""
    order = rows.argsort()
    ordered = rows[order]
    pos = torch.searchsorted(ordered, idx.contiguous()).clamp_(max=ordered.numel() - 1)
    hit = ordered[pos] == idx
    weights = g.new_zeros(idx.shape[0], ordered.numel()).scatter_add_(1, pos, g * hit)
    return torch.mm(weights, delta.index_select(0, order))


class _Scores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor, memory: Tensor, idx: Tensor, strategy: str, log: UpdateLog) -> Tensor:
        ctx.save_for_backward(idx)
        ctx.memory, ctx.strategy, ctx.log = memory, strategy, log  # the live bank: no copy, no version check
        return _forward(memory, z.detach(), idx, strategy)

    @staticmethod
    def backward(ctx, g: Tensor):
        (idx,) = ctx.saved_tensors
        grad = _backward(ctx.memory, g, idx)
        for rows, delta in ctx.log.entries:  # back to the bank the forward read
            grad += _correction(g, idx, rows, delta)
        return grad, None, None, None, None


def bank_scores(memory: Tensor, z: Tensor, idx: Tensor, strategy: str, logs: list) -> Tensor:
    """Scores of ``z`` against ``memory[idx]`` by ``strategy`` (``'full'`` or ``'rows'``), gradient to ``z``.

    When a gradient is needed, a fresh :class:`UpdateLog` is registered (as a weak reference) in ``logs``,
    the bank owner's list: its updates before this graph's backward must be recorded there.
    """
    if not (torch.is_grad_enabled() and z.requires_grad):
        return _forward(memory, z, idx, strategy)
    log = UpdateLog()
    logs[:] = [r for r in logs if r() is not None]
    logs.append(weakref.ref(log))
    return _Scores.apply(z, memory, idx, strategy, log)
