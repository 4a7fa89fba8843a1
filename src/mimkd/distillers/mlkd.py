"""``mlkd``: Jin et al.'s multi-level logit distillation (CVPR 2023; docs/methods/mlkd.md).

The student matches the teacher's softened predictions ``P = softmax(z/T)`` at several temperatures
("prediction augmentation", ``T ∈ {T₀, 3, 5, 2, 6}``, ``T₀`` the base temperature) and at three levels:

* instance: ``T² · KL(P_t[b] ‖ P_s[b])`` per sample, averaged over the batch (KD);
* class: the C×C class-correlation matrices ``PᵀP`` of the batch, ``‖G_t − G_s‖²_F / C``;
* batch: the B×B sample-similarity matrices ``PPᵀ``, ``‖M_t − M_s‖²_F / B``;

on a weak view (the run's crop and flip) and a strong view (crop, flip, RandAugment and Cutout:
:mod:`mimkd.data.views`) of each image. Confidence masks from the teacher's weak-view predictions keep the
less confident half: samples whose top probability is at most the batch median, classes whose summed
probability is at most the median over classes. ``L = γ·(CE(weak) + CE(strong)) + α·(kd + cc + bc)``.

The reference code (Jin-Ying/Multi-Level-Logit-Distillation, ``mdistiller/distillers/KD_ours.py``) is
followed exactly by default (``as_released=True``); it differs from the description above in three places
(docs/methods/mlkd.md lists them): each per-sample mask multiplies an already batch-averaged loss, so it
scales the weak-view terms by the fraction of samples (classes) it keeps instead of selecting them; the
strong-view instance terms at the 4th and 5th temperatures (2 and 6) read the *weak* logits; the strong
view's class and batch terms are computed there but not added to the loss. ``as_released=False`` applies
the masks per sample (class) — the reference's commented-out ``reduce=False`` — and computes every
strong-view instance term on the strong logits.

``logit_standardize=True`` z-scores both networks' logits (:mod:`.logit_std`) in the instance terms only,
as the logit-standardisation code does (sunshangquan/logit-standardization-KD,
``mdistiller/distillers/MLKD.py``); ``mlkd+ls`` takes that code's defaults: base temperature 2, α = 9.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat

from .base import Capabilities, Distiller, MethodOptions
from .logit_std import loss_dtype, standardize_logits
from .registry import register_distiller

__all__ = [
    "MLKD",
    "MLKDLS",
    "MLKDOptions",
    "MLKDLSOptions",
    "batch_relation",
    "class_relation",
    "confidence_masks",
    "instance_kd",
    "mlkd_terms",
]

EXTRA_TEMPERATURES = (3.0, 5.0, 2.0, 6.0)  # the reference's fixed temperatures after the base one
_WEAK_FROM = 3  # as released, the strong view's instance terms from this temperature index read weak logits


def _probs(z: torch.Tensor, t: float) -> torch.Tensor:
    return F.softmax(z.to(loss_dtype(z)) / t, dim=1)


def instance_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    *,
    standardize: bool = False,
) -> torch.Tensor:
    """``T² · KL(softmax(t/T) ‖ softmax(s/T))`` per sample (a B vector); z-scored logits first with
    ``standardize``."""
    dt = loss_dtype(student_logits, teacher_logits)
    s, t = student_logits.to(dt), teacher_logits.to(dt)
    if standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    log_p_s = F.log_softmax(s / temperature, dim=1)
    log_p_t = F.log_softmax(t / temperature, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * temperature**2


def class_relation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``(G_t − G_s)² / C`` with ``G = PᵀP`` (C×C, summed over the batch): the class-level residual."""
    p_s, p_t = _probs(student_logits, temperature), _probs(teacher_logits, temperature)
    return (p_t.T @ p_t - p_s.T @ p_s).pow(2) / p_s.shape[1]


def batch_relation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``(M_t − M_s)² / B`` with ``M = PPᵀ`` (B×B): the batch-level residual."""
    p_s, p_t = _probs(student_logits, temperature), _probs(teacher_logits, temperature)
    return (p_t @ p_t.T - p_s @ p_s.T).pow(2) / p_s.shape[0]


def confidence_masks(teacher_weak_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sample_mask B, class_mask C)``: the teacher's top probability per sample ≤ its batch median, and
    the probability summed over the batch per class ≤ its median over classes (medians with linear
    interpolation, ``np.percentile(·, 50)`` as in the reference). No host read: the medians stay on device."""
    p = F.softmax(teacher_weak_logits.detach().float(), dim=1)
    conf = p.max(dim=1).values
    per_class = p.sum(dim=0)
    return conf <= torch.quantile(conf, 0.5), per_class <= torch.quantile(per_class, 0.5)


def mlkd_terms(
    s_weak: torch.Tensor,
    t_weak: torch.Tensor,
    s_strong: torch.Tensor,
    t_strong: torch.Tensor,
    temperatures: tuple[float, ...] = (4.0, *EXTRA_TEMPERATURES),
    *,
    standardize: bool = False,
    as_released: bool = True,
) -> dict[str, torch.Tensor]:
    """The unweighted ``kd``, ``cc`` and ``bc`` terms of MLKD (module docstring) from both views' logits."""
    for name, z in (("teacher weak", t_weak), ("student strong", s_strong), ("teacher strong", t_strong)):
        if z.shape != s_weak.shape:
            raise ValueError(
                f"logit shapes differ: student weak {tuple(s_weak.shape)}, {name} {tuple(z.shape)}"
            )
    m, cm = confidence_masks(t_weak)
    m_f, cm_f = m.to(loss_dtype(s_weak)), cm.to(loss_dtype(s_weak))
    kd = cc = bc = s_weak.new_zeros((), dtype=loss_dtype(s_weak))
    for i, t in enumerate(temperatures):
        weak = instance_kd(s_weak, t_weak, t, standardize=standardize)
        strong_pair = (s_weak, t_weak) if as_released and i >= _WEAK_FROM else (s_strong, t_strong)
        strong = instance_kd(*strong_pair, t, standardize=standardize).mean()
        c_res, b_res = class_relation(s_weak, t_weak, t), batch_relation(s_weak, t_weak, t)
        if as_released:  # a mask times a batch mean: the mean scaled by the share the mask keeps
            kd = kd + weak.mean() * m_f.mean() + strong
            cc = cc + c_res.sum() * cm_f.mean()
            bc = bc + b_res.sum() * m_f.mean()
        else:  # per sample (class): the reference's commented-out reduce=False
            kd = kd + (weak * m_f).mean() + strong
            cc = cc + (c_res * cm_f).mean()
            bc = bc + (b_res * m_f).mean()
    return {"kd": kd, "cc": cc, "bc": bc}


class MLKDOptions(MethodOptions):
    """MLKD's options; defaults are the reference's (``cfg.KD``: T 4, CE 0.1, KD 0.9; temperatures 3, 5, 2, 6
    fixed in ``KD_ours.py``). Its CIFAR-100 recipe (``configs/cifar100/ours/*.yaml``): batch 64, lr 0.025
    (0.01 for ShuffleNet students), weight decay 5e-4, ×0.1 at epochs 150/180/210, 480 epochs at its code
    release (later commits: 960 for ShuffleV2, 240 for the same-family pairs): docs/methods/mlkd.md."""

    temperature: float = Field(4.0, gt=0.0)  # the base temperature, first of the set
    extra_temperatures: tuple[PositiveFloat, ...] = EXTRA_TEMPERATURES
    ce_weight: float = Field(0.1, ge=0.0)  # γ, on CE(weak) + CE(strong)
    kd_weight: float = Field(0.9, ge=0.0)  # α, on every distillation term
    logit_standardize: bool = False  # z-score both networks' logits in the instance terms
    as_released: bool = True  # the reference code's arithmetic (module docstring); False: per-sample masks


class MLKDLSOptions(MLKDOptions):
    """``mlkd+ls``: MLKD with logit standardisation, the defaults of sunshangquan/logit-standardization-KD
    (``tools/train.py`` with ``--logit-stand``: ``--base-temp 2``, ``--kd-weight 9``; CE 0.1 from its
    ``cfg.py``)."""

    temperature: float = Field(2.0, gt=0.0)
    kd_weight: float = Field(9.0, ge=0.0)
    logit_standardize: bool = True


@register_distiller("mlkd")
class MLKD(Distiller):
    """Multi-level logit distillation on a weak and a strong view; terms ``ce``, ``kd``, ``cc``, ``bc``.
    No extra parameters. The logits returned (train accuracy) are the weak view's."""

    Options = MLKDOptions
    capabilities = Capabilities(views=("strong",))

    def compute(self, images, labels, index=None, ctx=None):
        o = self.options
        strong = self.view("strong")
        s_weak, s_strong = self.student(images), self.student(strong)
        (t_weak, _), (t_strong, _) = self.teacher_outputs(images), self.teacher_outputs(strong)
        terms = {}
        if o.ce_weight:
            terms["ce"] = o.ce_weight * (
                self.cross_entropy(s_weak, labels) + self.cross_entropy(s_strong, labels)
            )
        if o.kd_weight:
            temps = (o.temperature, *o.extra_temperatures)
            parts = mlkd_terms(
                s_weak,
                t_weak,
                s_strong,
                t_strong,
                temps,
                standardize=o.logit_standardize,
                as_released=o.as_released,
            )
            terms.update({k: o.kd_weight * v for k, v in parts.items()})
        return s_weak, terms


@register_distiller("mlkd+ls")
class MLKDLS(MLKD):
    """MLKD with logit standardisation in the instance terms (T₀ = 2, α = 9); the same parts as ``mlkd``."""

    Options = MLKDLSOptions
