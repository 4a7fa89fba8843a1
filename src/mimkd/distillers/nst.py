"""``nst``: neuron selectivity transfer (Huang & Wang; docs/methods/nst.md, RepDistiller ``NSTLoss``).

Per pair of ``feat[1:-1]`` maps (taken by position, the larger pooled to the smaller size) each channel's
spatial map is L2-normalised (B×C×HW); with the polynomial kernel ``k(a, b) = (aᵀb)²`` the loss is the MMD²
``mean k(t, t) (detached) + mean k(s, s) − 2·mean k(s, t)`` over all channel pairs of a sample and the
batch; summed over the pairs. Channel counts may differ. Defaults: γ = 1, α = 0, β = 50 (docs/methods/nst.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from .at import check_map_pairs, map_pairs
from .feature_base import BaselineOptions, FeatureDistiller, FeatureLists, pool_to_common
from .registry import register_distiller

__all__ = ["poly_kernel", "nst_loss", "NST", "NSTOptions"]


def poly_kernel(a: Tensor, b: Tensor) -> Tensor:
    """``(aᵀb)²`` between every channel of ``a`` (B×Ca×N) and of ``b`` (B×Cb×N): B×Ca×Cb."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2)


def nst_loss(fs: list[Tensor], ft: list[Tensor]) -> Tensor:
    """Sum over pairs ``(fs[i], ft[i])`` of the polynomial-kernel MMD² between the channel-normalised maps.

    Zero for identical maps, for any positive per-channel rescaling and for any channel permutation.
    """
    if len(fs) != len(ft) or not fs:
        raise ValueError(f"nst_loss needs equally long, non-empty lists, got {len(fs)} and {len(ft)}")
    total = fs[0].new_zeros(())
    for s, t in zip(fs, ft):
        if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0]:
            raise ValueError(
                f"nst_loss: need B×C×H×W maps of one batch, got {tuple(s.shape)} and {tuple(t.shape)}"
            )
        s, t = pool_to_common(s, t)
        s = F.normalize(s.flatten(2), dim=2)
        t = F.normalize(t.flatten(2), dim=2).detach()
        total = total + (poly_kernel(t, t).mean() + poly_kernel(s, s).mean() - 2 * poly_kernel(s, t).mean())
    return total


class NSTOptions(BaselineOptions):
    weight: float = Field(50.0, ge=0.0)  # β


@register_distiller("nst")
class NST(FeatureDistiller):
    """Neuron selectivity transfer on every position-paired stage output."""

    Options = NSTOptions

    def points(self, s: FeatureLists, t: FeatureLists) -> tuple[list[str], list[str]]:
        self.pairs = map_pairs(s, t, "nst")
        return [sp for _, sp in self.pairs], [tp for tp, _ in self.pairs]

    def build_modules(self, context):
        check_map_pairs(self, "nst")

    def method_loss(self, fs, ft, logits, t_logits, index):
        return nst_loss([fs[s] for _, s in self.pairs], [ft[t] for t, _ in self.pairs])
