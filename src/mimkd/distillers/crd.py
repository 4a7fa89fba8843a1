"""``crd``, ``crd+kd``: Contrastive Representation Distillation (Tian et al., ICLR 2020; docs/methods/crd.md).

Both networks' pre-classifier vectors ``feat[-1]`` go through their own trainable ``Embed`` (``Linear(d→128)``
then L2 normalisation). The embeddings are contrasted against CRD's two momentum memory banks
(:class:`~mimkd.mi.contrast.BankContrast`, shared with MIMKD's global term): student anchors against the
teacher bank and teacher anchors against the student bank, each anchor scored against its own bank row (the
positive) and ``K = 16384`` rows of samples of other classes, ``τ = 0.07``. The loss is CRD's NCE
(:func:`~mimkd.mi.bounds.crd_nce_loss`: ``P = exp(score/τ)/Z``, ``Z`` fixed at the first call, noise
probability ``K/N``, eps 1e-7), summed over the two directions; then both banks are updated with momentum 0.5
and their touched rows re-normalised.

Weights (RepDistiller's command line): ``crd`` is ``γ = 1, α = 0, β = 0.8``; ``crd+kd`` is ``γ = 1, α = 1,
β = 0.8`` (KD T = 4).
The method needs the training labels (negatives come from other classes) and each sample's dataset index
(``forward(images, labels, index)``).

Speed: the bank scores come from one ``z @ Mᵀ`` GEMM over the whole ``N×128`` bank followed by a gather
(:meth:`~mimkd.mi.memory.MemoryBank.scores`), instead of RepDistiller's gather of ``B×(K+1)×128`` rows. A
step's contrast is then four ``B×128×N`` GEMMs (two directions, forward and backward), the class-aware
negative sampler and the element-wise NCE over ``2×B×(K+1)`` scores with its gather/scatter (timings:
results/dev_cpu_notes.md).

Deviations from RepDistiller: negatives are drawn on the fly by the distiller (class-aware, without
replacement, as the reference's ``mode='exact'``) rather than by the data loader; the L2 normalisation has
eps 1e-12 (``F.normalize``), the reference divides by the bare norm.
"""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from mimkd.errors import MethodError
from mimkd.mi.contrast import BankContrast

from .base import DistillContext
from .feature_base import BaselineOptions, FeatureDistiller, FeatureLists
from .registry import register_distiller

__all__ = ["CRD", "CRDKD", "CRDKDOptions", "CRDOptions", "Embed", "crd_loss", "embed_heads"]


class Embed(nn.Module):
    """CRD's embedding head: flatten, ``Linear(d→D)``, L2-normalise each row."""

    def __init__(self, dim_in: int, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear(x.flatten(1)), dim=1)


def crd_loss(
    contrast: BankContrast, embed_s: Embed, embed_t: Embed, f_s: Tensor, f_t: Tensor, index: Tensor
) -> tuple[Tensor, Tensor]:
    """CRD's loss (sum of both NCE directions) on pre-classifier vectors; updates the banks of ``contrast``.

    Returns the loss and the NCE estimate (minus the mean per-direction loss, detached).
    """
    return contrast(embed_s(f_s), embed_t(f_t), index)


def embed_heads(d: FeatureDistiller, context: DistillContext, feat_dim: int) -> tuple[Embed, Embed]:
    """The student's and the teacher's :class:`Embed` heads on ``d.s_point`` / ``d.t_point`` (``feat[-1]``)
    of a memory-bank method (CRD, WCoRD), which also needs the training labels for class-aware negatives."""
    if context.train_labels is None:
        raise MethodError(
            f"{d.name}: the memory-bank contrast needs the training labels (negatives are drawn from "
            "other classes): pass train_labels to build_distiller (the trainer passes the training set's)"
        )
    d_s = d.s_specs[d.s_point].vector_dim(d.name, "student")
    d_t = d.t_specs[d.t_point].vector_dim(d.name, "teacher")
    return Embed(d_s, feat_dim), Embed(d_t, feat_dim)


class CRDOptions(BaselineOptions):
    """RepDistiller's ``-r 1 -a 0 -b 0.8``; CRD's ``--feat_dim 128 --nce_k 16384 --nce_t 0.07 --nce_m 0.5``.

    ``num_negatives`` is K, ``temperature`` τ, ``momentum`` the banks' m; the banks have one row per training
    sample (N = the number of training labels).
    """

    weight: float = Field(0.8, ge=0.0)  # β
    feat_dim: int = Field(128, ge=1)
    num_negatives: int = Field(16384, ge=1)
    temperature: float = Field(0.07, gt=0.0)
    momentum: float = Field(0.5, ge=0.0, lt=1.0)


class CRDKDOptions(CRDOptions):
    """``crd+kd``: RepDistiller's CRD+KD line, ``-r 1 -a 1 -b 0.8``."""

    kd_weight: float = Field(1.0, ge=0.0)  # α


@register_distiller("crd")
class CRD(FeatureDistiller):
    """Contrastive representation distillation on ``feat[-1]`` with two momentum memory banks."""

    Options = CRDOptions
    term_name = "crd"

    def points(self, s: FeatureLists, t: FeatureLists) -> tuple[list[str], list[str]]:
        self.s_point, self.t_point = s.embedding, t.embedding
        return [s.embedding], [t.embedding]

    def build_modules(self, context: DistillContext) -> None:
        o = self.options
        self.embed_s, self.embed_t = embed_heads(self, context, o.feat_dim)
        self.contrast = BankContrast(
            context.train_labels,
            dim=o.feat_dim,
            num_negatives=o.num_negatives,
            temperature=o.temperature,
            momentum=o.momentum,
            loss="nce",
            directions="both",
        )

    def method_loss(self, fs, ft, logits, t_logits, index):
        loss, _ = crd_loss(
            self.contrast, self.embed_s, self.embed_t, fs[self.s_point], ft[self.t_point], index
        )
        return loss

    def describe(self) -> dict:
        info = super().describe()
        info["memory_bank"] = {
            "samples": self.contrast.num_samples,
            "dim": self.options.feat_dim,
            "negatives": self.options.num_negatives,
            "buffers": 2,
        }
        return info


@register_distiller("crd+kd")
class CRDKD(CRD):
    """CRD plus logit KD (``α = 1``); the same parts, other weight defaults."""

    Options = CRDKDOptions
