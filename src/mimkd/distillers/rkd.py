"""``rkd``: relational knowledge distillation (Park et al.; docs/methods/rkd.md, RepDistiller ``RKDLoss``).

On ``feat[-1]`` flattened to B×D: distance term ``smoothL1(ψ_D(s)/μ_s, ψ_D(t)/μ_t)`` with Euclidean pairwise
distances (squared distances clamped at 1e-12 before the square root, diagonal zeroed) and ``μ`` the mean of
the positive distances; angle term ``smoothL1`` over all B³ cosines ``⟨e_ij, e_ik⟩``, ``e_ij =
normalise(x_j − x_i)``. Loss ``w_d·L_D + w_a·L_A`` (w_d = 25, w_a = 50); the teacher side carries no gradient.
Relations only, so the embedding widths may differ. Defaults: γ = 1, α = 0, β = 1 (RepDistiller).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from mimkd.errors import MethodError

from .feature_base import BaselineOptions, FeatureDistiller, FeatureLists
from .registry import register_distiller

__all__ = ["pairwise_distances", "angle_cosines", "rkd_loss", "RKD", "RKDOptions"]


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """B×B Euclidean distances ``sqrt(clamp(‖x_i‖² + ‖x_j‖² − 2⟨x_i, x_j⟩, eps))`` with a zero diagonal."""
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=eps).sqrt()
    return d * (1 - torch.eye(len(e), device=e.device, dtype=e.dtype))


def angle_cosines(e: Tensor) -> Tensor:
    """All B³ cosines ``⟨e_ij, e_ik⟩`` of the unit difference vectors (0 where ``j = i`` or ``k = i``)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # [i, j] = normalise(x_j − x_i)
    return torch.bmm(diff, diff.transpose(1, 2)).flatten()


def rkd_loss(f_s: Tensor, f_t: Tensor, w_d: float = 25.0, w_a: float = 50.0) -> Tensor:
    """``w_d·smoothL1`` of the mean-normalised distances plus ``w_a·smoothL1`` of the angle cosines.

    Zero when ``f_s = c·f_t + b`` (c > 0). Needs a batch of at least 2 (distances between samples).
    """
    s, t = f_s.flatten(1), f_t.flatten(1).detach()
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"rkd_loss: batch sizes differ ({s.shape[0]} vs {t.shape[0]})")
    if s.shape[0] < 2:
        raise MethodError(f"rkd needs a batch of at least 2 (pairwise relations), got {s.shape[0]}")
    loss = s.new_zeros(())
    if w_d:
        d_t = pairwise_distances(t)
        d_t = d_t / d_t[d_t > 0].mean()
        d_s = pairwise_distances(s)
        d_s = d_s / d_s[d_s > 0].mean()
        loss = loss + w_d * F.smooth_l1_loss(d_s, d_t)
    if w_a:
        loss = loss + w_a * F.smooth_l1_loss(angle_cosines(s), angle_cosines(t))
    return loss


class RKDOptions(BaselineOptions):
    weight: float = Field(1.0, ge=0.0)  # β
    w_d: float = Field(25.0, ge=0.0)  # distance term
    w_a: float = Field(50.0, ge=0.0)  # angle term


@register_distiller("rkd")
class RKD(FeatureDistiller):
    """Distance- and angle-wise relational distillation on the pre-classifier vectors."""

    Options = RKDOptions

    def points(self, s: FeatureLists, t: FeatureLists) -> tuple[list[str], list[str]]:
        return [s.embedding], [t.embedding]

    def method_loss(self, fs, ft, logits, t_logits, index):
        o = self.options
        return rkd_loss(fs[self.s_lists.embedding], ft[self.t_lists.embedding], o.w_d, o.w_a)
