"""``at``: attention transfer (Zagoruyko & Komodakis; docs/methods/at.md, RepDistiller ``Attention``).

For a map ``F`` (B×C×H×W) the attention map is ``a(F) = L2normalise(flatten(mean_c |F|^p))`` (B×HW, p = 2).
Per pair ``mean_{B×HW} (a_s − a_t)²``; summed over the pairs of ``feat[1:-1]`` taken by position (zip
truncation), the larger map adaptive-avg-pooled to the smaller one's size first. The channel mean makes the
loss independent of the channel counts. Defaults: γ = 1, α = 0, β = 1000 (RepDistiller).
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from mimkd.errors import MethodError

from .feature_base import BaselineOptions, FeatureDistiller, FeatureLists, index_pairs, pool_to_common
from .registry import register_distiller

__all__ = ["attention_map", "at_loss", "AT", "ATOptions"]


def attention_map(f: Tensor, p: float = 2.0) -> Tensor:
    """``L2normalise(flatten(mean_c |F|^p))``: a B×(H·W) unit-norm spatial attention vector per sample."""
    return F.normalize(f.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def at_loss(fs: list[Tensor], ft: list[Tensor], p: float = 2.0) -> Tensor:
    """Sum over pairs ``(fs[i], ft[i])`` of ``mean((a(s) − a(t))²)``; pairs of different spatial size are
    compared after pooling the larger map to the smaller one. Zero when ``s = c·t`` (c > 0)."""
    if len(fs) != len(ft) or not fs:
        raise ValueError(f"at_loss needs equally long, non-empty lists, got {len(fs)} and {len(ft)}")
    total = fs[0].new_zeros(())
    for s, t in zip(fs, ft):
        if s.dim() != 4 or t.dim() != 4 or s.shape[0] != t.shape[0]:
            raise ValueError(
                f"at_loss: need B×C×H×W maps of one batch, got {tuple(s.shape)} and {tuple(t.shape)}"
            )
        s, t = pool_to_common(s, t)
        total = total + (attention_map(s, p) - attention_map(t, p)).pow(2).mean()
    return total


class ATOptions(BaselineOptions):
    weight: float = Field(1000.0, ge=0.0)  # β
    p: float = Field(2.0, gt=0.0)


def map_pairs(s: FeatureLists, t: FeatureLists, method: str) -> list[tuple[str, str]]:
    """RepDistiller's ``zip(feat_s[1:-1], feat_t[1:-1])`` as ``(teacher point, student point)`` pairs."""
    pairs = index_pairs(t.maps, s.maps)
    if not pairs:
        raise MethodError(f"{method}: the networks have no feature maps to pair (feat[1:-1] is empty)")
    return pairs


def check_map_pairs(d: FeatureDistiller, method: str) -> None:
    """Refuse a pair whose points are not B×C×H×W maps (e.g. a foreign model's vector output)."""
    for tp, sp in d.pairs:
        ts, ss = d.t_specs[tp], d.s_specs[sp]
        if not (ts.is_map and ss.is_map):
            raise MethodError(
                f"{method} needs feature maps, but teacher point {tp!r} has shape {ts.shape} and student "
                f"point {sp!r} has shape {ss.shape} (per sample)"
            )


@register_distiller("at")
class AT(FeatureDistiller):
    """Attention transfer on every position-paired stage output (any architectures, any channel counts)."""

    Options = ATOptions

    def points(self, s: FeatureLists, t: FeatureLists) -> tuple[list[str], list[str]]:
        self.pairs = map_pairs(s, t, "at")
        return [sp for _, sp in self.pairs], [tp for tp, _ in self.pairs]

    def build_modules(self, context):
        check_map_pairs(self, "at")

    def method_loss(self, fs, ft, logits, t_logits, index):
        return at_loss([fs[s] for _, s in self.pairs], [ft[t] for t, _ in self.pairs], self.options.p)
