"""``kd``: Hinton et al.'s knowledge distillation (docs/methods/kd.md, RepDistiller ``DistillKL``).

Loss ``γ·CE + α·KD`` with ``KD = T²/B · Σ_b KL(softmax(z_t/T) ‖ softmax(z_s/T))``; defaults are RepDistiller's
command line (γ = 0.1, α = 0.9, T = 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import Distiller, MethodOptions
from .registry import register_distiller

__all__ = ["kd_loss", "KD", "KDOptions"]


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> torch.Tensor:
    """``T²/B · Σ_b KL(softmax(t/T) ‖ softmax(s/T))`` (sum over classes, mean over the batch).

    Zero iff ``s = t + c·1`` row-wise; its gradient w.r.t. ``s`` is ``T·(p_s − p_t)/B``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"logit shapes differ: student {tuple(student_logits.shape)}, "
            f"teacher {tuple(teacher_logits.shape)}"
        )
    t = temperature
    # float32 even under bf16 autocast: the KL is a difference of nearby log-probabilities (CUDA's autocast
    # upcasts log_softmax by itself, the CPU's does not); a no-op for float32 logits
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()
    return kl * t * t


class KDOptions(MethodOptions):
    temperature: float = Field(4.0, gt=0.0)
    ce_weight: float = Field(0.1, ge=0.0)  # γ
    kd_weight: float = Field(0.9, ge=0.0)  # α


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
            terms["kd"] = o.kd_weight * kd_loss(logits, t_logits, o.temperature)
        return logits, terms
