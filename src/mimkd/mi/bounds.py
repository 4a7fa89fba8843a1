"""Mutual-information lower bounds on critic scores (pure functions, no modules).

Every function takes the critic's scores for positive pairs (samples of the joint ``P(a, b)``) and for
negative pairs (samples of the product of marginals ``P(a)P(b)``) and returns a scalar. The ``*_bound``
functions return the estimate to *maximise*; the ``*_loss`` functions return the quantity to *minimise* (the
negated bound, up to a constant where stated). Estimates against known MI: ``docs/mi_estimators.md``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mimkd.errors import MethodError

__all__ = [
    "LOG4",
    "crd_nce_loss",
    "dv_bound",
    "infonce_bound",
    "infonce_loss",
    "jsd_bound",
    "jsd_loss",
]

LOG4 = math.log(4.0)
"""``2 log 2``: the constant by which Deep InfoMax's shifted JSD estimate exceeds Eq. 2."""


def _check_tensor(name: str, x: object, fn: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise MethodError(f"{fn}: {name} must be a torch.Tensor of critic scores, got {type(x).__name__}")
    if not x.is_floating_point():
        raise MethodError(
            f"{fn}: {name} must be a floating-point tensor of critic scores, got dtype {x.dtype}"
        )
    if x.numel() == 0:
        raise MethodError(f"{fn}: {name} is empty (shape {tuple(x.shape)}); at least one score is needed")
    return x


def _check_pos_neg(pos: object, neg: object, fn: str) -> tuple[Tensor, Tensor]:
    """Check the infoNCE layout: pos (...,) and neg (..., K) with equal leading dims."""
    pos = _check_tensor("pos", pos, fn)
    neg = _check_tensor("neg", neg, fn)
    if pos.dim() < 1 or tuple(neg.shape[:-1]) != tuple(pos.shape):
        raise MethodError(
            f"{fn}: expected pos of shape (B,) and neg of shape (B, K) (a row of K negatives per positive), "
            f"got pos {tuple(pos.shape)} and neg {tuple(neg.shape)}"
        )
    return pos, neg


# ----------------------------------------------------------------------------------------------------- JSD
def jsd_bound(pos: Tensor, neg: Tensor, shift: bool = False) -> Tensor:
    """Jensen-Shannon MI lower bound (MIMKD Eq. 2): ``E_pos[-sp(-T)] - E_neg[sp(T)]``.

    ``pos`` and ``neg`` may have any (and different) shapes, e.g. ``B×1×m×m`` score maps or ``B`` vectors;
    each expectation is the mean over all elements of its own tensor, so one shuffled negative per positive
    (MIMKD) and DIM's all-pairs negatives (``B×(B-1)``) are both handled. The value is ``≤ 0``; it equals
    ``-log 4`` when all scores are 0.

    ``shift=True`` returns Deep InfoMax's shifted version (positive term ``log 2 - sp(-T)``, negative term
    ``sp(T) - log 2``), which is exactly ``log 4`` larger; gradients are identical.
    """
    pos = _check_tensor("pos", pos, "jsd_bound")
    neg = _check_tensor("neg", neg, "jsd_bound")
    bound = -F.softplus(-pos).mean() - F.softplus(neg).mean()
    return bound + LOG4 if shift else bound


def jsd_loss(pos: Tensor, neg: Tensor, shift: bool = False) -> Tensor:
    """Loss to minimise for the JSD bound: ``mean sp(-T_pos) + mean sp(T_neg)`` = ``-jsd_bound``.

    Equal to ``BCEWithLogits(T_pos, 1) + BCEWithLogits(T_neg, 0)`` with each term averaged separately.
    ``shift=True`` subtracts ``log 4`` (the negated DIM-shifted bound).
    """
    return -jsd_bound(pos, neg, shift=shift)


# ------------------------------------------------------------------------------------------------- infoNCE
def infonce_bound(pos: Tensor, neg: Tensor) -> Tensor:
    """infoNCE MI lower bound (MIMKD Eq. 1): ``mean_b[T_b - logsumexp(T_b, N_b)] + log(K+1)``.

    ``pos``: scores of the positive pairs, shape ``(B,)``; ``neg``: shape ``(B, K)``, row ``b`` holding the K
    negatives of anchor ``b`` (more leading dimensions are allowed as long as ``neg.shape[:-1] ==
    pos.shape``). The value lies in ``(-inf, log(K+1)]``; it is 0 when all K+1 logits of every row are equal.
    """
    pos, neg = _check_pos_neg(pos, neg, "infonce_bound")
    k = neg.shape[-1]
    logits = torch.cat([pos.unsqueeze(-1), neg], dim=-1)
    return (pos - torch.logsumexp(logits, dim=-1)).mean() + math.log(k + 1)


def infonce_loss(pos: Tensor, neg: Tensor) -> Tensor:
    """Softmax cross-entropy over ``[T_pos, T_neg...]`` with the positive at index 0.

    Equals ``log(K+1) - infonce_bound(pos, neg)``; shapes as in :func:`infonce_bound`.
    """
    pos, neg = _check_pos_neg(pos, neg, "infonce_loss")
    logits = torch.cat([pos.unsqueeze(-1), neg], dim=-1).flatten(0, -2)
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits, target)


# ------------------------------------------------------------------------------------------------------ DV
def dv_bound(pos: Tensor, neg: Tensor) -> Tensor:
    """Donsker-Varadhan bound (Deep InfoMax): ``E_pos[T] - (logsumexp(T_neg) - log N_neg)``.

    The log-mean-exp runs over *all* negative scores together (every element of ``neg``); ``pos`` is averaged
    over all its elements. Shapes are free.

    On a minibatch the log-mean-exp is biased low, so the estimate is biased *up*: a critic trained on it can
    exploit this and report more than the true MI (measured on correlated Gaussians of 12 nats: 20.5, while
    that critic's exact DV bound was negative; ``docs/mi_estimators.md``). Use it to read out a trained
    critic over many negatives, not as a training objective at high MI.
    """
    pos = _check_tensor("pos", pos, "dv_bound")
    neg = _check_tensor("neg", neg, "dv_bound")
    return pos.mean() - (torch.logsumexp(neg.flatten(), dim=0) - math.log(neg.numel()))


# ------------------------------------------------------------------------------------------------- CRD-NCE
def crd_nce_loss(pos_prob: Tensor, neg_prob: Tensor, n_data: int, eps: float = 1e-7) -> Tensor:
    """CRD's NCE loss for one anchor direction (Tian et al. 2020; RepDistiller ``crd/criterion.py``).

    Inputs are *normalised* scores ``P = exp(s/τ)/Z`` (not logits): ``pos_prob`` of shape ``(B,)`` and
    ``neg_prob`` of shape ``(B, K)``. With noise probability ``K/N`` (``N = n_data``)::

        loss = -mean_b [ log(P_0 / (P_0 + K/N + eps)) + Σ_k log((K/N) / (P_k + K/N + eps)) ]

    With every ``P = 1/N`` and ``eps = 0`` this is ``log(K+1) + K·log((K+1)/K)``.
    """
    pos_prob, neg_prob = _check_pos_neg(pos_prob, neg_prob, "crd_nce_loss")
    if pos_prob.dim() != 1:
        raise MethodError(
            f"crd_nce_loss: expected pos_prob of shape (B,) and neg_prob of shape (B, K), got "
            f"{tuple(pos_prob.shape)} and {tuple(neg_prob.shape)}"
        )
    if isinstance(n_data, bool) or not isinstance(n_data, int) or n_data < 1:
        raise MethodError(f"crd_nce_loss: n_data must be a positive int (the dataset size), got {n_data!r}")
    if eps < 0:
        raise MethodError(f"crd_nce_loss: eps must be >= 0, got {eps}")
    k = neg_prob.shape[1]
    noise = k / n_data  # K · P_n with P_n = 1/N
    log_d1 = torch.log(pos_prob / (pos_prob + (noise + eps)))
    log_d0 = torch.log(noise / (neg_prob + (noise + eps)))
    return -(log_d1.sum() + log_d0.sum()) / pos_prob.shape[0]
