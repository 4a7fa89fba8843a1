"""Entropic optimal transport by log-domain Sinkhorn iterations (generic; WCoRD: docs/methods/wcord.md).

:func:`sinkhorn_log` solves ``min_π <π, C> − ε H(π)`` subject to ``π 1 = a``, ``πᵀ 1 = b`` for a cost ``C``
(``n×m``, or a batch ``…×n×m``) and marginals ``a``, ``b`` (uniform ``1/n``, ``1/m`` by default). It runs a
fixed number of iterations on the scaled dual potentials ``u, v`` (``π = exp(−C/ε + u ⊕ v)``), each a
``logsumexp`` over one axis, so it stays finite for any ``ε > 0`` (the plain kernel ``exp(−C/ε)`` underflows
for ``C/ε`` above ~88 in float32). The update order is POT's ``ot.sinkhorn(method='sinkhorn_log')``: the
column potential ``v`` first, then the row potential ``u``, so after the last iteration the row marginals are
exact and the column marginals carry the remaining error. Unlike POT it has no convergence test (the
iteration count is fixed: WCoRD uses 50, docs/methods/wcord.md) and no per-call backend dispatch.

``benchmarks/bench_sinkhorn.py`` compares it with POT on WCoRD's batch sizes (``results/bench_sinkhorn.md``).
The function is differentiable, but WCoRD treats the plan as a constant: call it under ``torch.no_grad()``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mimkd.errors import MethodError

__all__ = ["sinkhorn_log", "sinkhorn_pot"]


def _log_marginal(m: Tensor | None, size: int, like: Tensor, name: str) -> Tensor:
    if m is None:
        return torch.full((size,), -math.log(size), dtype=like.dtype, device=like.device)
    if not isinstance(m, Tensor) or m.dim() != 1 or m.numel() != size or not bool((m > 0).all()):
        raise MethodError(f"sinkhorn_log: {name} must be a 1-D tensor of {size} positive weights")
    return torch.log(m.to(device=like.device, dtype=like.dtype))


def _check(cost: object, eps: float, iters: int, fn: str) -> Tensor:
    if not isinstance(cost, Tensor) or cost.dim() < 2 or not cost.is_floating_point() or 0 in cost.shape:
        raise MethodError(f"{fn}: cost must be a non-empty floating-point tensor of shape (…, n, m)")
    if not eps > 0:
        raise MethodError(f"{fn}: eps must be > 0, got {eps!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise MethodError(f"{fn}: iters must be a positive int, got {iters!r}")
    return cost


def sinkhorn_log(
    cost: Tensor, eps: float = 0.05, iters: int = 50, a: Tensor | None = None, b: Tensor | None = None
) -> Tensor:
    """Entropic OT plan for ``cost`` (``…×n×m``) with marginals ``a`` (n,) and ``b`` (m,), uniform by default.

    Float16/bfloat16 costs are solved in float32; the plan is returned in float32 (or float64 for a float64
    cost). ``eps`` is absolute (in the units of ``cost``); ``iters`` Sinkhorn iterations (one column and one
    row update each).
    """
    cost = _check(cost, eps, iters, "sinkhorn_log")
    if cost.dtype not in (torch.float32, torch.float64):
        cost = cost.float()
    n, m = cost.shape[-2:]
    log_a = _log_marginal(a, n, cost, "a")
    log_b = _log_marginal(b, m, cost, "b")
    scaled = cost / -eps
    u = torch.zeros(cost.shape[:-1], dtype=cost.dtype, device=cost.device)
    v = torch.zeros((*cost.shape[:-2], m), dtype=cost.dtype, device=cost.device)
    for _ in range(iters):
        v = log_b - torch.logsumexp(scaled + u.unsqueeze(-1), dim=-2)
        u = log_a - torch.logsumexp(scaled + v.unsqueeze(-2), dim=-1)
    return torch.exp(scaled + u.unsqueeze(-1) + v.unsqueeze(-2))


def sinkhorn_pot(
    cost: Tensor, eps: float = 0.05, iters: int = 50, a: Tensor | None = None, b: Tensor | None = None
) -> Tensor:
    """The same plan from POT (``ot.sinkhorn(..., method='sinkhorn_log')``, torch backend), if installed.

    Exactly ``iters`` iterations (POT's convergence test disabled); a 2-D cost only. POT is an optional
    dependency (``pip install pot``).
    """
    cost = _check(cost, eps, iters, "sinkhorn_pot")
    if cost.dim() != 2:
        raise MethodError("sinkhorn_pot: POT's solver takes a single n×m cost matrix")
    try:
        import ot
    except ImportError:
        raise MethodError(
            "sinkhorn='pot' needs the POT library (Python Optimal Transport): pip install pot — or use the "
            "built-in solver, sinkhorn='log_domain'"
        ) from None
    if cost.dtype not in (torch.float32, torch.float64):
        cost = cost.float()
    a = cost.new_full((cost.shape[0],), 1.0 / cost.shape[0]) if a is None else a.to(cost)
    b = cost.new_full((cost.shape[1],), 1.0 / cost.shape[1]) if b is None else b.to(cost)
    return ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=iters, stopThr=0.0, warn=False)
