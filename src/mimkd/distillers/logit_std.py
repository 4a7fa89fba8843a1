"""Logit standardisation (Sun et al., CVPR 2024; docs/methods/logit_std.md), shared by the logit methods.

Each sample's logit vector is z-scored over its classes before the temperature softmax of a distillation
term: ``(z − mean(z)) / (std(z) + ε)``, then divided by the method's (base) temperature as before. The
student then has to match the teacher's logit *relations* (their order and relative spacing), not their
range: the result does not change when either network's logits are replaced by ``a·z + b·1`` with ``a > 0``
(up to ``ε``).

The details follow the reference code (sunshangquan/logit-standardization-KD, ``normalize`` in
``mdistiller/distillers/KD.py`` and ``DKD.py``): the mean and the standard deviation are taken over the
class dimension, the standard deviation is the *unbiased* one (divisor ``K − 1``, ``torch.std``'s default),
and ``ε = 1e-7`` is added to the standard deviation, not under the square root.

This module only holds the transform; the methods that use it (``kd``/``kd+ls``, ``dkd``/``dkd+ls``) register
themselves in their own files.
"""

from __future__ import annotations

import torch

__all__ = ["LS_EPS", "loss_dtype", "standardize_logits"]

LS_EPS = 1e-7  #: added to the standard deviation (reference: ``1e-7 + stdv``)


def loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a logit loss computes in: float32, or float64 when an input is float64.

    bf16/fp16 logits (autocast) are upcast: a KL divergence is a difference of nearby log-probabilities.
    float64 stays float64 so that ``torch.autograd.gradcheck`` can check the losses.
    """
    dt = torch.float32
    for t in tensors:
        dt = torch.promote_types(dt, t.dtype)
    return dt


def standardize_logits(z: torch.Tensor, eps: float = LS_EPS) -> torch.Tensor:
    """Z-score each row of ``z`` (B × K) over its K classes: ``(z − mean) / (std + eps)``.

    ``std`` is the unbiased standard deviation (divisor ``K − 1``), as ``torch.std`` in the reference code.
    Computed in float32 (float64 for float64 input). A constant row maps to zeros with a finite gradient:
    the variance is clamped at the dtype's smallest normal number before the square root, which changes no
    value the reference computes (its ``std`` is then 0, and ``eps`` dominates either way).
    """
    if z.dim() != 2:
        raise ValueError(f"standardize_logits expects B × K logits, got shape {tuple(z.shape)}")
    if z.shape[1] < 2:
        raise ValueError("standardize_logits needs at least 2 classes (the unbiased std divides by K − 1)")
    z = z.to(loss_dtype(z))
    centred = z - z.mean(dim=1, keepdim=True)
    var = centred.pow(2).sum(dim=1, keepdim=True) / (z.shape[1] - 1)
    std = var.clamp_min(torch.finfo(z.dtype).tiny).sqrt()
    return centred / (std + eps)
