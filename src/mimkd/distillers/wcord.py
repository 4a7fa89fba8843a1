"""``wcord`` and ``wcord+kd``: Wasserstein Contrastive Representation Distillation (Chen et al., CVPR 2021).

See docs/methods/wcord.md: the supplement's algorithm, with our choices where the main paper's Eq. 11 / 13
leave it open. Loss ``γ·CE + α·KD + β·(λ1·L_GCKT + λ2·L_LCKT)``, terms logged as ``ce``, ``kd``, ``gckt``,
``lckt``.

* **Embeddings.** As CRD: each network's ``feat[-1]`` goes through its own trainable :class:`Embed`
  (``Linear(d→128)`` then L2 normalisation), ``e_T(h^T)`` and ``e_S(h^S)``.
* **GCKT** (dual form of the Wasserstein dependency measure, :func:`gckt_loss`). Critic
  ``g(t, s) = <e_T(t), e_S(s)>/τ``, τ = 0.07, scored against CRD's two momentum banks (m = 0.5) with
  ``K = 16384`` class-aware negatives (:class:`WassersteinBankContrast`, composed of
  :class:`~mimkd.mi.memory.MemoryBank` and :class:`~mimkd.mi.memory.ClassAwareNegativeSampler`). Per direction
  ``L = −(mean_i g(t_i, M_S[i]) − mean_{i,k} g(t_i, M_S[k]))`` (joint minus product of marginals: the
  Kantorovich–Rubinstein dual), teacher anchors against the student bank plus student anchors against the
  teacher bank; both banks are updated after the loss, as CRD does. ``metrics['w_dual']`` is the mean
  per-direction dual estimate (``−L``, in units of ``g``).
* **Lipschitz control** (``lipschitz``). The KR dual needs ``‖g‖_L ≤ 1``, otherwise its supremum is infinite.
  Here ``|g| ≤ 1/τ`` for any heads (unit vectors; CRD's random initial bank rows have norm ≈ 1 until first
  written), so the estimate lies in ``[−2/τ, 2/τ]`` and cannot diverge.
  In the embedding space ``τ·g`` is 1-Lipschitz in each argument (``|<a,b> − <a',b>| ≤ ‖a − a'‖`` for unit
  ``b``), √2-Lipschitz jointly, so the estimate is at most ``(√2/τ)·W1`` between the joint and the product of
  the embedded distributions: a scaled lower bound, with no constraint needed. Towards the raw features,
  ``"spectral_norm"`` (default) puts :func:`torch.nn.utils.parametrizations.spectral_norm` on both heads'
  linear layers (largest singular value 1, one power iteration per training step). Caveat: the L2
  normalisation is scale-invariant, so spectral norm changes the heads' function only through the
  weight/bias ratio, and ``normalize`` adds a factor ``1/‖Wh+b‖``: it limits, not certifies, the constant
  w.r.t. ``h``. ``"none"`` leaves CRD's plain heads. A gradient penalty (λ_GP = 10) is not implemented: the
  critic's second argument is a bank row (a stored embedding, no input to differentiate), and it would cost a
  double backward for a constant already bounded in embedding space.
* **LCKT** (primal form within the batch, :func:`lckt_loss`). Uniform marginals ``1/n``, cost
  ``C_ij = 1 − cos(e_T(h^T_i), e_S(h^S_j))`` on the same 128-d embeddings as GCKT (the raw pooled vectors of
  teacher and student generally differ in width, e.g. vgg13 512 vs MobileNetV2 1280, so a cosine between them
  is undefined). The teacher embedding is detached here: the supplement minimises LCKT over θ_S only, and
  letting the teacher head follow would let both heads shrink the cost together. The plan ``π*`` comes from
  entropic OT, log-domain Sinkhorn (:func:`~mimkd.mi.sinkhorn.sinkhorn_log`), ε = 0.05 (absolute, costs in
  [0, 2]), 50 iterations, under ``torch.no_grad`` (a constant); ``L = Σ_ij π*_ij C_ij``, so the gradient flows
  through ``C`` only. ``metrics['ot_cost']`` is ``L``. GCKT cannot see a component shared by all embeddings
  (it cancels between the joint and the marginal term), so only LCKT pulls the student's common offset
  towards the teacher's; ``ot_cost`` may stay well above 0 although the plan, which is invariant to such
  offsets, already matches the right samples. ``sinkhorn="pot"`` uses POT's solver instead (same
  updates, same plan; optional, ``pip install pot``); ours was the faster on batches 64–256 (timings:
  results/dev_cpu_notes.md, ``results/bench_sinkhorn.md``), so it is the default.
* **Weights.** λ1 = ``gckt_weight`` = 0.8, λ2 = ``lckt_weight`` = 0.1 (our choice; the supplement's
  ablation fixes λ2 = 0.1 and finds λ1 = 0.8 best); β = ``weight`` = 1 scales both (RepDistiller's ``-b``;
  0 switches the method off). ``wcord``: γ = 1, α = 0; ``wcord+kd``: α = 1, KD T = 4. A term whose λ is 0 is
  not computed (λ1 = 0: no bank reads or updates).

The method needs the training labels (class-aware negatives) and each sample's dataset index
(``forward(images, labels, index)``), as CRD. Deviations and choices beyond the supplement: Eq. 11 of the
main paper could not be checked; the GCKT form above is our reading (docs/methods/wcord.md). No gradient
penalty.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from mimkd.errors import MethodError
from mimkd.mi.memory import ClassAwareNegativeSampler, MemoryBank
from mimkd.mi.sinkhorn import sinkhorn_log, sinkhorn_pot

from .base import DistillContext
from .crd import CRD, embed_heads
from .feature_base import BaselineOptions, FeatureDistiller
from .registry import register_distiller

__all__ = [
    "WCoRD",
    "WCoRDKD",
    "WCoRDKDOptions",
    "WCoRDOptions",
    "WassersteinBankContrast",
    "cosine_cost",
    "gckt_loss",
    "lckt_loss",
]

SOLVERS = {"log_domain": sinkhorn_log, "pot": sinkhorn_pot}


def gckt_loss(pos: Tensor, neg: Tensor) -> Tensor:
    """Negated KR dual for one direction: ``−(mean(pos) − mean(neg))``.

    ``pos`` (B,) are critic values on joint pairs (anchor, its own bank row), ``neg`` (B, K) on
    product-of-marginals pairs (anchor, other-class bank rows); both already divided by τ.
    """
    if pos.dim() != 1 or neg.dim() != 2 or neg.shape[0] != pos.shape[0] or neg.shape[1] == 0:
        raise MethodError(
            f"gckt_loss: expected pos (B,) and neg (B, K), got {tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    return neg.mean() - pos.mean()


def cosine_cost(h_t: Tensor, h_s: Tensor) -> Tensor:
    """``C_ij = 1 − cos(h_t[i], h_s[j])`` (float32 or float64), in [0, 2]."""
    if h_t.dim() != 2 or h_s.dim() != 2 or h_t.shape[1] != h_s.shape[1]:
        raise MethodError(
            f"cosine_cost: expected two n×d and m×d matrices, got {tuple(h_t.shape)} and {tuple(h_s.shape)}"
        )
    dtype = torch.float64 if torch.float64 in (h_t.dtype, h_s.dtype) else torch.float32
    return 1.0 - F.normalize(h_t.to(dtype), dim=1) @ F.normalize(h_s.to(dtype), dim=1).t()


def lckt_loss(
    h_t: Tensor, h_s: Tensor, eps: float = 0.05, iters: int = 50, solver: str = "log_domain"
) -> tuple[Tensor, Tensor]:
    """``Σ_ij π*_ij C_ij`` with the cosine cost and the entropic plan ``π*`` (uniform marginals, no gradient).

    Returns the loss and the plan. Gradients flow through ``C`` to both inputs (detach one to stop it).
    """
    if solver not in SOLVERS:
        raise MethodError(f"lckt_loss: solver must be one of {sorted(SOLVERS)}, got {solver!r}")
    cost = cosine_cost(h_t, h_s)
    with torch.no_grad():
        plan = SOLVERS[solver](cost.detach(), eps, iters).to(cost.dtype)
    return (plan * cost).sum(), plan


class WassersteinBankContrast(nn.Module):
    """GCKT's bank contrast: CRD's two momentum banks and class-aware negatives, scored by the KR dual."""

    def __init__(
        self, labels: Tensor, dim: int = 128, num_negatives: int = 16384, temperature: float = 0.07,
        momentum: float = 0.5,
    ) -> None:  # fmt: skip
        super().__init__()
        if temperature <= 0:
            raise MethodError(f"WassersteinBankContrast: temperature must be > 0, got {temperature}")
        n = int(labels.numel())
        self.temperature = float(temperature)
        self.num_negatives = int(num_negatives)
        self.sampler = ClassAwareNegativeSampler(labels, num_negatives)
        self.bank_student = MemoryBank(n, dim, momentum)
        self.bank_teacher = MemoryBank(n, dim, momentum)

    @property
    def num_samples(self) -> int:
        return self.bank_student.num_samples

    def extra_repr(self) -> str:
        return f"K={self.num_negatives}, tau={self.temperature}"

    def _direction(self, z: Tensor, bank: MemoryBank, idx: Tensor) -> Tensor:
        g = bank.scores(z, idx) / self.temperature  # B×(K+1), the anchor's own row in column 0
        return gckt_loss(g[:, 0], g[:, 1:])

    def forward(self, z_student: Tensor, z_teacher: Tensor, index: Tensor | None) -> tuple[Tensor, Tensor]:
        """Loss (sum of both directions) and the mean per-direction dual estimate; updates both banks."""
        if index is None:
            raise MethodError(
                "the memory-bank contrast needs each sample's dataset index: call the distiller with "
                "(images, labels, index)"
            )
        idx = self.sampler.sample(index)
        loss = self._direction(z_teacher, self.bank_student, idx) + self._direction(
            z_student, self.bank_teacher, idx
        )
        self.bank_student.update(index, z_student)
        self.bank_teacher.update(index, z_teacher)
        return loss, -loss.detach() / 2


class WCoRDOptions(BaselineOptions):
    """docs/methods/wcord.md: CRD's bank settings, λ1 = 0.8, λ2 = 0.1, Sinkhorn ε = 0.05 × 50 iterations."""

    weight: float = Field(1.0, ge=0.0)  # β, multiplies both terms
    gckt_weight: float = Field(0.8, ge=0.0)  # λ1
    lckt_weight: float = Field(0.1, ge=0.0)  # λ2
    feat_dim: int = Field(128, ge=1)
    num_negatives: int = Field(16384, ge=1)
    temperature: float = Field(0.07, gt=0.0)
    momentum: float = Field(0.5, ge=0.0, lt=1.0)
    lipschitz: Literal["spectral_norm", "none"] = "spectral_norm"
    sinkhorn: Literal["log_domain", "pot"] = "log_domain"
    sinkhorn_epsilon: float = Field(0.05, gt=0.0)
    sinkhorn_iters: int = Field(50, ge=1)


class WCoRDKDOptions(WCoRDOptions):
    """``wcord+kd``: the same plus logit KD, α = 1 (T = 4)."""

    kd_weight: float = Field(1.0, ge=0.0)  # α


@register_distiller("wcord")
class WCoRD(FeatureDistiller):
    """WCoRD on ``feat[-1]``: global (bank, KR dual) and local (in-batch entropic OT) transfer."""

    Options = WCoRDOptions

    points = CRD.points  # feat[-1] of both networks, as CRD

    def build_modules(self, context: DistillContext) -> None:
        o = self.options
        self.embed_s, self.embed_t = embed_heads(self, context, o.feat_dim)
        if o.lipschitz == "spectral_norm":
            spectral_norm(self.embed_s.linear)
            spectral_norm(self.embed_t.linear)
        self.contrast = WassersteinBankContrast(
            context.train_labels, o.feat_dim, o.num_negatives, o.temperature, o.momentum
        )

    def term_weights(self) -> dict[str, float]:
        return {"gckt": self.options.gckt_weight, "lckt": self.options.lckt_weight}

    def method_loss(self, fs, ft, logits, t_logits, index):
        o = self.options
        z_s = self.embed_s(fs[self.s_point])
        z_t = self.embed_t(ft[self.t_point])
        terms: dict[str, Tensor] = {}
        if o.gckt_weight:
            terms["gckt"], self.metrics["w_dual"] = self.contrast(z_s, z_t, index)
        if o.lckt_weight:
            loss, _ = lckt_loss(z_t.detach(), z_s, o.sinkhorn_epsilon, o.sinkhorn_iters, o.sinkhorn)
            terms["lckt"] = loss
            self.metrics["ot_cost"] = loss.detach()
        return terms

    def describe(self) -> dict:
        info = super().describe()
        o = self.options
        info["memory_bank"] = {
            "samples": self.contrast.num_samples,
            "dim": o.feat_dim,
            "negatives": o.num_negatives,
            "buffers": 2,
        }
        info["sinkhorn"] = {"solver": o.sinkhorn, "epsilon": o.sinkhorn_epsilon, "iters": o.sinkhorn_iters}
        info["lipschitz"] = o.lipschitz
        return info


@register_distiller("wcord+kd")
class WCoRDKD(WCoRD):
    """WCoRD plus logit KD (``α = 1``); the same parts, other weight defaults."""

    Options = WCoRDKDOptions
