"""``dist``: Huang et al.'s DIST, correlation-based logit distillation (docs/methods/dist.md).

The student's and the teacher's softened predictions ``P = softmax(z/τ)`` (B × C) are compared through Pearson
correlations instead of a KL divergence:

* inter-class relation: ``τ² · mean_b (1 − ρ(P_s[b, :], P_t[b, :]))``, each sample's vector over the classes;
* intra-class relation: ``τ² · mean_c (1 − ρ(P_s[:, c], P_t[:, c]))``, each class's vector over the batch;

and ``L = w_ce · CE + β · inter + γ · intra``. ``ρ(u, v) = ⟨ū, v̄⟩ / (‖ū‖·‖v̄‖ + 1e-8)`` with
``ū = u − mean(u)``: the ``1e-8`` is added to the product of the norms, as in the reference
``pearson_correlation``.

Defaults are the CIFAR-100 recipe of the reference code (hunto/image_classification_sota,
``configs/strategies/distill/dist_cifar.yaml``: CE weight 1, KD weight 2 on ``DIST(β=1, γ=1, τ=4)``), i.e.
``ce_weight=1, beta=2, gamma=2, temperature=4``. Its ImageNet recipe (``resnet_dist.yaml``, ``dist_b2.yaml``)
differs only in the temperature: ``ce_weight=1, beta=2, gamma=2, temperature=1``
(``--set method.temperature=1``).
"""

from __future__ import annotations

import torch
from pydantic import Field

from .base import Distiller, MethodOptions
from .registry import register_distiller

__all__ = [
    "DIST",
    "DISTOptions",
    "dist_loss",
    "dist_terms",
    "inter_class_relation",
    "intra_class_relation",
    "pearson_rows",
]

PEARSON_EPS = 1e-8  # added to the product of the two centred norms (reference: ``eps=1e-8``)


def pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = PEARSON_EPS) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (a vector, one entry per row).

    A row that is constant in either matrix has a zero centred vector and gets correlation 0.
    """
    da = a - a.mean(dim=1, keepdim=True)
    db = b - b.mean(dim=1, keepdim=True)
    return (da * db).sum(dim=1) / (da.norm(dim=1) * db.norm(dim=1) + eps)


def inter_class_relation(p_s: torch.Tensor, p_t: torch.Tensor, eps: float = PEARSON_EPS) -> torch.Tensor:
    """``1 − mean_b ρ(p_s[b], p_t[b])``: each sample's prediction vector over the classes (no ``τ²``)."""
    return 1.0 - pearson_rows(p_s, p_t, eps).mean()


def intra_class_relation(p_s: torch.Tensor, p_t: torch.Tensor, eps: float = PEARSON_EPS) -> torch.Tensor:
    """``1 − mean_c ρ(p_s[:, c], p_t[:, c])``: each class's predictions across the batch (no ``τ²``)."""
    return inter_class_relation(p_s.t(), p_t.t(), eps)


def _compute_dtype(x: torch.Tensor) -> torch.Tensor:
    # float32 at least, even under bf16 autocast: the correlations are ratios of sums of products of centred
    # probabilities (small differences of nearby numbers); float64 stays float64 (gradcheck)
    return x if x.dtype == torch.float64 else x.float()


def dist_terms(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(τ²·inter, τ²·intra)`` on ``softmax(z/τ)``, unweighted.

    Both are in ``[0, 2τ²]`` and zero when the student's probabilities equal the teacher's (up to the 1e-8 of
    the correlation). A per-row shift of either set of logits changes nothing (the softmax does not see it).
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"DIST needs two (batch, classes) logit matrices of one shape: student "
            f"{tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}"
        )
    t = temperature
    p_s = torch.softmax(_compute_dtype(student_logits) / t, dim=1)
    p_t = torch.softmax(_compute_dtype(teacher_logits) / t, dim=1)
    scale = t * t
    return scale * inter_class_relation(p_s, p_t), scale * intra_class_relation(p_s, p_t)


def dist_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    beta: float = 2.0,
    gamma: float = 2.0,
) -> torch.Tensor:
    """``β·τ²·inter + γ·τ²·intra`` (the DIST term without the cross-entropy)."""
    inter, intra = dist_terms(student_logits, teacher_logits, temperature)
    return beta * inter + gamma * intra


class DISTOptions(MethodOptions):
    ce_weight: float = Field(1.0, ge=0.0)  # ``ori_loss_weight``
    beta: float = Field(2.0, ge=0.0)  # inter-class weight: kd_loss_weight 2 × DIST's β = 1
    gamma: float = Field(2.0, ge=0.0)  # intra-class weight: kd_loss_weight 2 × DIST's γ = 1
    temperature: float = Field(
        4.0, gt=0.0
    )  # τ: 4 on CIFAR-100 (``kd: dist_t4``), 1 on ImageNet (``kd: dist``)


@register_distiller("dist")
class DIST(Distiller):
    """Logit distillation by Pearson correlations; no features, no extra parameters."""

    Options = DISTOptions

    def compute(self, images, labels, index=None, ctx=None):
        o = self.options
        logits = self.student(images)
        t_logits, _ = self.teacher_outputs(images)
        terms = {}
        if o.ce_weight:
            terms["ce"] = o.ce_weight * self.cross_entropy(logits, labels)
        if o.beta or o.gamma:
            inter, intra = dist_terms(logits, t_logits, o.temperature)
            if o.beta:
                terms["dist_inter"] = o.beta * inter
            if o.gamma:
                terms["dist_intra"] = o.gamma * intra
        return logits, terms
