"""``pkt``: probabilistic knowledge transfer (Passalis & Tefas; docs/methods/pkt.md, RepDistiller ``PKT``).

On ``feat[-1]`` (flattened): each vector is divided by ``‖x‖ + ε``, cosine-similarity matrices (B×B) are
mapped to ``(c + 1)/2`` and each row normalised to sum to one (conditional probabilities ``p_{j|i}``); loss
``mean_{ij} p_t log((p_t + ε)/(p_s + ε))`` with ε = 1e-7. Works for any two embedding widths.
Defaults: γ = 1, α = 0, β = 30000 (RepDistiller).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from .feature_base import BaselineOptions, FeatureDistiller, FeatureLists
from .registry import register_distiller

__all__ = ["pkt_probabilities", "pkt_loss", "PKT", "PKTOptions"]

EPS = 1e-7


def pkt_probabilities(f: Tensor, eps: float = EPS) -> Tensor:
    """Row-stochastic B×B matrix ``((cos + 1)/2) / Σ_row`` of ``f`` flattened per sample."""
    x = f.flatten(1)
    x = torch.nan_to_num(x / (x.norm(dim=1, keepdim=True) + eps), nan=0.0)
    sim = (x @ x.t() + 1.0) / 2.0
    return sim / sim.sum(dim=1, keepdim=True)


def pkt_loss(f_s: Tensor, f_t: Tensor, eps: float = EPS) -> Tensor:
    """``mean_{ij} p_t log((p_t + ε)/(p_s + ε))``; zero (to float precision) when ``f_s = c·f_t``, c > 0."""
    if f_s.shape[0] != f_t.shape[0]:
        raise ValueError(f"pkt_loss: batch sizes differ ({f_s.shape[0]} vs {f_t.shape[0]})")
    p_s, p_t = pkt_probabilities(f_s, eps), pkt_probabilities(f_t, eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


class PKTOptions(BaselineOptions):
    weight: float = Field(30000.0, ge=0.0)  # β


@register_distiller("pkt")
class PKT(FeatureDistiller):
    """Probabilistic knowledge transfer on the pre-classifier vectors."""

    Options = PKTOptions

    def points(self, s: FeatureLists, t: FeatureLists) -> tuple[list[str], list[str]]:
        return [s.embedding], [t.embedding]

    def method_loss(self, fs, ft, logits, t_logits, index):
        return pkt_loss(fs[self.s_lists.embedding], ft[self.t_lists.embedding])
