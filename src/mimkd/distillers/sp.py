"""``sp``: similarity-preserving distillation (Tung & Mori; docs/methods/sp.md, RepDistiller ``Similarity``).

On the last feature map ``feat[-2]`` flattened to B×D: ``G = F·Fᵀ`` (B×B), each row L2-normalised, loss
``‖G_t − G_s‖_F² / B²``. ``G`` is B×B whatever the channel counts and spatial sizes, so no pooling is needed.
Defaults: γ = 1, α = 0, β = 3000 (RepDistiller's command line).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from .feature_base import BaselineOptions, FeatureDistiller, FeatureLists
from .registry import register_distiller

__all__ = ["similarity_matrix", "sp_loss", "SP", "SPOptions"]


def similarity_matrix(f: Tensor) -> Tensor:
    """Row-L2-normalised Gram matrix ``normalise(F·Fᵀ)`` (B×B) of ``f`` flattened per sample."""
    flat = f.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


def sp_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """``‖G_t − G_s‖_F² / B²`` between the batch similarity matrices; zero when ``f_s = c·f_t`` (c > 0)."""
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"sp_loss: batch sizes differ ({f_s.shape[0]} vs {f_t.shape[0]})")
    b = f_s.shape[0]
    return (similarity_matrix(f_t) - similarity_matrix(f_s)).pow(2).sum() / (b * b)


class SPOptions(BaselineOptions):
    weight: float = Field(3000.0, ge=0.0)  # β


@register_distiller("sp")
class SP(FeatureDistiller):
    """Similarity preservation on the last feature map of each network."""

    Options = SPOptions

    def points(self, s: FeatureLists, t: FeatureLists) -> tuple[list[str], list[str]]:
        return [s.last_map], [t.last_map]

    def method_loss(self, fs, ft, logits, t_logits, index):
        return sp_loss(fs[self.s_lists.last_map], ft[self.t_lists.last_map])
