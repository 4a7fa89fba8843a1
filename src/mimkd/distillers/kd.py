"""``kd``: Hinton et al.'s knowledge distillation (docs/methods/kd.md, RepDistiller ``DistillKL``).

Loss ``γ·CE + α·KD`` with ``KD = T²/B · Σ_b KL(softmax(z_t/T) ‖ softmax(z_s/T))``; defaults are RepDistiller's
command line (γ = 0.1, α = 0.9, T = 4).

``logit_standardize=True`` z-scores both networks' logits before the temperature in the KD term (not in the
cross-entropy): Sun et al.'s logit standardisation (docs/methods/logit_std.md). ``kd+ls`` is the same method
with the CIFAR-100 defaults of their code (sunshangquan/logit-standardization-KD): γ = 0.1
(``mdistiller/engine/cfg.py``, ``CFG.KD.LOSS.CE_WEIGHT``), α = 9 and base temperature T = 2
(``tools/train.py``, ``--kd-weight 9`` / ``--base-temp 2``, the values its README runs for KD+LS).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import Distiller, MethodOptions
from .logit_std import loss_dtype, standardize_logits
from .registry import register_distiller

__all__ = ["kd_loss", "KD", "KDOptions", "KDLS", "KDLSOptions"]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    *,
    standardize: bool = False,
) -> torch.Tensor:
    """``T²/B · Σ_b KL(softmax(t/T) ‖ softmax(s/T))`` (sum over classes, mean over the batch).

    Zero iff ``s = t + c·1`` row-wise; its gradient w.r.t. ``s`` is ``T·(p_s − p_t)/B``. With
    ``standardize=True`` both rows are z-scored first (:func:`~.logit_std.standardize_logits`), so ``T`` is
    the base temperature of logit standardisation and the loss is zero iff ``s`` and ``t`` agree up to a
    positive affine map per row (up to the standardisation's ε).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit shapes differ: student {tuple(student_logits.shape)}, "
            f"teacher {tuple(teacher_logits.shape)}"
        )
    t = temperature
    # float32 even under bf16 autocast: the KL is a difference of nearby log-probabilities (CUDA's autocast
    # upcasts log_softmax by itself, the CPU's does not); a no-op for float32 logits (float64 stays float64)
    dt = loss_dtype(student_logits, teacher_logits)
    s, z_t = student_logits.to(dt), teacher_logits.to(dt)
    if standardize:
        s, z_t = standardize_logits(s), standardize_logits(z_t)
    log_p_s = F.log_softmax(s / t, dim=1)
    log_p_t = F.log_softmax(z_t / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * t * t


class KDOptions(MethodOptions):
    temperature: float = Field(4.0, gt=0.0)
    ce_weight: float = Field(0.1, ge=0.0)  # γ
    kd_weight: float = Field(0.9, ge=0.0)  # α
    logit_standardize: bool = False  # z-score both networks' logits before the temperature (KD term only)


class KDLSOptions(KDOptions):
    """``kd+ls``: KD with logit standardisation, the CIFAR-100 values of sunshangquan/logit-standardization-KD
    (γ = 0.1 from its ``cfg.py``; α = 9 and base temperature 2 from ``tools/train.py``'s ``--kd-weight`` /
    ``--base-temp`` defaults, the values its README runs). Per-pair values of its logs:
    docs/methods/logit_std.md.
    """

    temperature: float = Field(2.0, gt=0.0)
    kd_weight: float = Field(9.0, ge=0.0)
    logit_standardize: bool = True


@register_distiller("kd")
class KD(Distiller):
    """Logit distillation; no features, no extra parameters."""

    Options = KDOptions

    def compute(self, images, labels, index=None, ctx=None):
        o = self.options
        logits = self.student(images)
        t_logits, _ = self.teacher_outputs(images)
        terms = {}
        if o.ce_weight:
            terms["ce"] = o.ce_weight * self.cross_entropy(logits, labels)
        if o.kd_weight:
            terms["kd"] = o.kd_weight * kd_loss(
                logits, t_logits, o.temperature, standardize=o.logit_standardize
            )
        return logits, terms


@register_distiller("kd+ls")
class KDLS(KD):
    """KD on standardised logits (``logit_standardize=True``, T = 2, α = 9); the same parts as ``kd``."""

    Options = KDLSOptions
