"""``dkd``: Zhao et al.'s Decoupled Knowledge Distillation (CVPR 2022; docs/methods/dkd.md).

KD's KL divergence splits, for a sample of class ``y``, into a binary part over {target, non-target} and a
part over the non-target classes alone; DKD weights the two independently:

* TCKD: ``T² · mean_b KL(b_t ‖ b_s)`` with ``b = [p_y, 1 − p_y]`` and ``p = softmax(z/T)``;
* NCKD: ``T² · mean_b KL(q_t ‖ q_s)`` with ``q = softmax`` of the non-target logits ``z_{k≠y}/T`` (the
  non-target probabilities renormalised to sum to one);

``L = γ·CE + w(epoch)·(α·TCKD + β·NCKD)``, ``w`` a linear warm-up of the distillation terms. The reference
(megvii-research/mdistiller, ``mdistiller/distillers/DKD.py``) drops the target class from NCKD by
subtracting 1000 from its tempered logit before a softmax over all classes; the target's probability then
underflows to exactly 0, so that softmax *is* the renormalised non-target distribution: here the non-target
logits are selected instead (the same values, no dependence on the logits' range). TCKD's binary
log-probabilities come from log-sum-exps instead of the reference's ``log`` of summed probabilities (the
same values, finite where ``1 − p_y`` rounds to 0).

Defaults are mdistiller's (``mdistiller/engine/cfg.py``: ``CFG.DKD`` CE_WEIGHT 1, ALPHA 1, BETA 8, T 4,
WARMUP 20). Its warm-up is ``min(epoch / WARMUP, 1)`` with a 1-based epoch (``mdistiller/engine/trainer.py``
counts from 1), i.e. ``min((e + 1) / 20, 1)`` for our 0-based epoch ``e``: :meth:`StepContext.warmup`. β per
CIFAR-100 pair (mdistiller's ``configs/cifar100/dkd/*.yaml``): :class:`DKDOptions`.

``logit_standardize=True`` z-scores both networks' logits (:mod:`.logit_std`) before the temperature in both
terms, as the LS reference code does (sunshangquan/logit-standardization-KD,
``mdistiller/distillers/DKD.py``). ``dkd+ls`` takes that code's defaults: ``tools/train.py`` with
``--logit-stand`` multiplies α and β by ``--kd-weight`` (default 9) and sets T to ``--base-temp`` (default 2):
α = 9, β = 72, T = 2, γ = 1, warm-up 20.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import Distiller, MethodOptions
from .logit_std import loss_dtype, standardize_logits
from .registry import register_distiller

__all__ = ["DKD", "DKDLS", "DKDOptions", "DKDLSOptions", "dkd_loss", "dkd_terms"]


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``mean_b Σ_k p_bk (log p_bk − log q_bk)`` from log-probabilities (``p`` the target distribution)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()


def dkd_terms(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 4.0,
    *,
    standardize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unweighted ``(TCKD, NCKD)`` of a batch, each ``T² · mean_b KL(teacher ‖ student)``.

    Args:
        student_logits, teacher_logits: B × K logits (K ≥ 2).
        target: the B class indices.
        temperature: T (the base temperature when ``standardize``).
        standardize: z-score both networks' logits first (:func:`~.logit_std.standardize_logits`).

    Both terms are 0 when the two networks' logits agree up to a constant per row (up to a positive
    affine map per row with ``standardize``). Computed in float32 (float64 for float64 input).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"dkd: logits must be B × K and alike, got student {tuple(student_logits.shape)}, "
            f"teacher {tuple(teacher_logits.shape)}"
        )
    b, k = student_logits.shape
    if k < 2:
        raise ValueError("dkd needs at least 2 classes (a target and a non-target)")
    target = target.reshape(-1)
    if target.numel() != b:
        raise ValueError(f"dkd: {target.numel()} labels for {b} samples")
    dt = loss_dtype(student_logits, teacher_logits)
    s, t = student_logits.to(dt), teacher_logits.to(dt)
    if standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    s, t = s / temperature, t / temperature
    is_target = F.one_hot(target.long(), k).bool()
    # the non-target logits of each row, in class order: B × (K − 1)
    s_other, t_other = s[~is_target].view(b, k - 1), t[~is_target].view(b, k - 1)

    def binary_log_probs(z: torch.Tensor, z_other: torch.Tensor) -> torch.Tensor:
        # [log p_y, log(1 − p_y)]: the target logit and the non-targets' log-sum-exp, minus the row's
        log_all = torch.logsumexp(z, dim=1, keepdim=True)
        z_y = z[is_target].view(b, 1)
        return torch.cat([z_y, torch.logsumexp(z_other, dim=1, keepdim=True)], dim=1) - log_all

    t2 = temperature * temperature
    tckd = _kl_rows(binary_log_probs(t, t_other), binary_log_probs(s, s_other)) * t2
    nckd = _kl_rows(F.log_softmax(t_other, dim=1), F.log_softmax(s_other, dim=1)) * t2
    return tckd, nckd


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    *,
    standardize: bool = False,
) -> torch.Tensor:
    """``α · TCKD + β · NCKD`` (no warm-up, no cross-entropy): mdistiller's ``dkd_loss``."""
    tckd, nckd = dkd_terms(student_logits, teacher_logits, target, temperature, standardize=standardize)
    return alpha * tckd + beta * nckd


class DKDOptions(MethodOptions):
    """DKD's options; defaults are mdistiller's ``CFG.DKD`` (``mdistiller/engine/cfg.py``).

    β per CIFAR-100 pair in mdistiller's ``configs/cifar100/dkd/*.yaml`` (all other options at their
    defaults; unset means 8):

    ======================  ====
    teacher → student        β
    ======================  ====
    resnet56 → resnet20      2
    resnet110 → resnet32     2
    resnet32x4 → resnet8x4   8
    wrn_40_2 → wrn_16_2      6
    wrn_40_2 → wrn_40_1      6
    vgg13 → vgg8             6
    vgg13 → MobileNetV2      6
    ResNet50 → MobileNetV2   8
    resnet32x4 → ShuffleV1   8
    resnet32x4 → ShuffleV2   8
    wrn_40_2 → ShuffleV1     8
    ======================  ====

    ImageNet ResNet-34 → ResNet-18 (``configs/imagenet/r34_r18/dkd.yaml``): ``beta=0.5, temperature=1,
    warmup_epochs=1``.
    """

    ce_weight: float = Field(1.0, ge=0.0)  # γ (CE_WEIGHT)
    alpha: float = Field(1.0, ge=0.0)  # weight of TCKD (ALPHA)
    beta: float = Field(8.0, ge=0.0)  # weight of NCKD (BETA)
    temperature: float = Field(4.0, gt=0.0)  # T
    warmup_epochs: int = Field(20, ge=0)  # WARMUP: the KD terms ramp as min((epoch + 1) / n, 1); 0 = none
    logit_standardize: bool = False  # z-score both networks' logits before the temperature


class DKDLSOptions(DKDOptions):
    """``dkd+ls``: DKD on standardised logits with the LS reference's defaults
    (sunshangquan/logit-standardization-KD ``tools/train.py``: α and β times ``--kd-weight`` 9, T =
    ``--base-temp`` 2). Its published per-pair runs used other values (docs/methods/logit_std.md).
    """

    alpha: float = Field(9.0, ge=0.0)
    beta: float = Field(72.0, ge=0.0)
    temperature: float = Field(2.0, gt=0.0)
    logit_standardize: bool = True


@register_distiller("dkd")
class DKD(Distiller):
    """Decoupled KD on the logits; no features, no extra parameters. Terms ``ce``, ``tckd``, ``nckd``
    (each weighted, the last two including the warm-up factor)."""

    Options = DKDOptions

    def compute(self, images, labels, index=None, ctx=None):
        o = self.options
        logits = self.student(images)
        t_logits, _ = self.teacher_outputs(images)
        terms = {}
        if o.ce_weight:
            terms["ce"] = o.ce_weight * self.cross_entropy(logits, labels)
        if o.alpha or o.beta:
            warm = ctx.warmup(o.warmup_epochs) if ctx is not None else 1.0
            tckd, nckd = dkd_terms(logits, t_logits, labels, o.temperature, standardize=o.logit_standardize)
            if o.alpha:
                terms["tckd"] = (warm * o.alpha) * tckd
            if o.beta:
                terms["nckd"] = (warm * o.beta) * nckd
        return logits, terms


@register_distiller("dkd+ls")
class DKDLS(DKD):
    """DKD with logit standardisation (α = 9, β = 72, T = 2); the same parts as ``dkd``."""

    Options = DKDLSOptions
