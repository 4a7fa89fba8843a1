"""``cc``: correlation congruence (Peng et al.; docs/methods/cc.md; RepDistiller ``Correlation``).

Two trainable ``Linear(d → 128)`` embeddings (no normalisation), one on each network's ``feat[-1]``
(flattened); with ``Δ = |e_s − e_t|`` (B×128) the loss is ``mean_{i<B−1} Σ_d Δ_{i,d}·Δ_{i+1,d}``
(consecutive samples of the batch; not the paper's Taylor-kernel correlation). Both embeddings are
optimised with the student. Defaults: γ = 1, α = 0, β = 0.02, embedding width 128 (RepDistiller's
command line and ``--feat_dim``).
"""

from __future__ import annotations

import math

from pydantic import Field
from torch import Tensor, nn

from mimkd.errors import MethodError

from .feature_base import BaselineOptions, FeatureDistiller, FeatureLists
from .registry import register_distiller

__all__ = ["cc_loss", "CC", "CCOptions"]


def cc_loss(e_s: Tensor, e_t: Tensor) -> Tensor:
    """``mean_{i<B−1} Σ_d Δ_{i,d}·Δ_{i+1,d}`` with ``Δ = |e_s − e_t|`` (B×D).

    Zero for identical embeddings. Needs a batch of at least 2 (consecutive samples).
    """
    if e_s.shape != e_t.shape:
        raise ValueError(f"cc_loss: embedding shapes differ ({tuple(e_s.shape)} vs {tuple(e_t.shape)})")
    if e_s.shape[0] < 2:
        raise MethodError(f"cc needs a batch of at least 2 (consecutive samples), got {e_s.shape[0]}")
    delta = (e_s - e_t).abs().flatten(1)
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


class CCOptions(BaselineOptions):
    weight: float = Field(0.02, ge=0.0)  # β
    feat_dim: int = Field(128, ge=1)


@register_distiller("cc")
class CC(FeatureDistiller):
    """Correlation congruence between learnt linear embeddings of the pre-classifier vectors."""

    Options = CCOptions

    def points(self, s: FeatureLists, t: FeatureLists) -> tuple[list[str], list[str]]:
        return [s.embedding], [t.embedding]

    def build_modules(self, context):
        d_s = math.prod(self.s_specs[self.s_lists.embedding].shape)
        d_t = math.prod(self.t_specs[self.t_lists.embedding].shape)
        self.embed_s = nn.Linear(d_s, self.options.feat_dim)
        self.embed_t = nn.Linear(d_t, self.options.feat_dim)

    def method_loss(self, fs, ft, logits, t_logits, index):
        e_s = self.embed_s(fs[self.s_lists.embedding].flatten(1))
        e_t = self.embed_t(ft[self.t_lists.embedding].flatten(1))
        return cc_loss(e_s, e_t)
