"""``dcm``: Dense Cross-layer Mutual-distillation (Yao & Sun, ECCV 2020), two networks, no teacher.

Method page: ``docs/methods/dcm.md``.

Each network gets two auxiliary classifiers (:mod:`mimkd.distillers.dcm_heads`): C2 after the second-to-last
resolution stage and C3 after the stage before it, each re-implementing the remaining stages with the
backbone's block type; C1 is the network's own classifier. With outputs ``(C3, C2, C1)`` per network::

    L = Σ_net Σ_c CE(z_c, y) + Σ_{a∈A} Σ_{b∈B} [ KL(p_b.detach() ‖ p_a) + KL(p_a.detach() ‖ p_b) ]

all 3×3 cross-network pairs, same-stage and cross-stage, both directions: 18 KL terms, temperature 1, no KL
between the classifiers of one network. The KL uses smoothed probabilities ``p̃ = (p + 1e-8)/(1 + C·1e-8)``,
summed over classes and averaged over the batch (the reference code's ``KL_divergence.py``). Logged terms:
``ce`` (both C1), ``ce_aux`` (the four auxiliaries), ``kl_same_stage`` (6 terms) and ``kl_cross_stage``
(12 terms), with weights ``ce_aux_weight`` (α), ``kl_same_stage_weight`` (β), ``kl_cross_stage_weight`` (γ),
all 1 as in the paper and the code. Per-classifier train accuracies go to ``metrics``.

The distiller owns the pair: ``self.student`` is ``net1`` (exported); the peer ``net2`` (``method.peer``, by
default the student's architecture) is built by ``context.build_network``. The heads read the backbones' stage
outputs through :class:`~mimkd.features.FeatureTap` forward hooks, so the backbones are unchanged: their
state dicts hold no head, the trainer evaluates and checkpoints ``networks()`` only, and the heads (in
``self.heads``, part of the method state and of the optimiser) are dropped at test time and at export.
``aux_head="apfc"`` uses the paper's ablation head (avg-pool to 4×4 + FC) and works for any model.

Deviations: one optimiser and one recipe (learning rate, weight decay, schedule) for both networks and all
heads, which the reference also uses; the WRN reference rebuilds its optimiser at each learning-rate step
(resetting momentum), we do not. For families the paper does not list, the head shapes are our choice
(documented in :mod:`mimkd.distillers.dcm_heads`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from mimkd.features import FeatureTap

from .base import Capabilities, DistillContext, Distiller, MethodOptions, StepContext
from .dcm_heads import AuxHeads, build_aux_heads
from .dml import build_peer
from .registry import register_distiller

__all__ = ["DCM", "DCMOptions", "dcm_kl", "dcm_kl_terms", "dcm_losses", "CLASSIFIERS"]

EPS = 1e-8
CLASSIFIERS = ("C3", "C2", "C1")  # the order of each network's outputs


def _smoothed_log_prob(logits: torch.Tensor) -> torch.Tensor:
    """``log p̃`` with ``p̃ = (softmax + 1e-8)/(1 + C·1e-8)`` (sums to 1)."""
    c = logits.shape[1]
    return torch.log((F.softmax(logits.float(), dim=1) + EPS) / (1.0 + c * EPS))


def dcm_kl(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(p̃_target.detach() ‖ p̃) = mean_b Σ_c p̃_t (log p̃_t − log p̃)``; the gradient reaches ``logits``
    only."""
    log_t = _smoothed_log_prob(target_logits.detach())
    return (log_t.exp() * (log_t - _smoothed_log_prob(logits))).sum(dim=1).mean()


def dcm_kl_terms(
    outs1: Sequence[torch.Tensor], outs2: Sequence[torch.Tensor], names: Sequence[str] = ("net1", "net2")
) -> dict[str, torch.Tensor]:
    """The 18 cross-network KL terms of two networks' ``(C3, C2, C1)`` logits.

    Key ``"net1.C3<-net2.C2"`` is ``KL(p_{net2.C2}.detach() ‖ p_{net1.C3})``: it trains net1's C3 toward
    net2's C2. Every key pairs one classifier of each network (no term within a network).
    """
    if len(outs1) != len(CLASSIFIERS) or len(outs2) != len(CLASSIFIERS):
        raise ValueError(f"each network must give {len(CLASSIFIERS)} outputs {CLASSIFIERS}")
    a, b = names
    terms: dict[str, torch.Tensor] = {}
    for i, ca in enumerate(CLASSIFIERS):
        for j, cb in enumerate(CLASSIFIERS):
            terms[f"{a}.{ca}<-{b}.{cb}"] = dcm_kl(outs2[j], outs1[i])
            terms[f"{b}.{cb}<-{a}.{ca}"] = dcm_kl(outs1[i], outs2[j])
    return terms


def dcm_losses(
    outs1: Sequence[torch.Tensor],
    outs2: Sequence[torch.Tensor],
    labels: torch.Tensor,
    ce_aux_weight: float = 1.0,
    kl_same_stage_weight: float = 1.0,
    kl_cross_stage_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """DCM's loss as named terms ``ce``, ``ce_aux``, ``kl_same_stage``, ``kl_cross_stage`` (weighted)."""
    ce = sum(F.cross_entropy(o[-1].float(), labels) for o in (outs1, outs2))
    ce_aux = sum(F.cross_entropy(z.float(), labels) for o in (outs1, outs2) for z in o[:-1])
    kl = dcm_kl_terms(outs1, outs2)
    same = sum(v for k, v in kl.items() if _same_stage(k))
    cross = sum(v for k, v in kl.items() if not _same_stage(k))
    return {
        "ce": ce,
        "ce_aux": ce_aux_weight * ce_aux,
        "kl_same_stage": kl_same_stage_weight * same,
        "kl_cross_stage": kl_cross_stage_weight * cross,
    }


def _same_stage(key: str) -> bool:
    left, right = key.split("<-")
    return left.split(".")[-1] == right.split(".")[-1]


class DCMOptions(MethodOptions):
    peer: str | None = None  # the second network's architecture (None: the student's)
    aux_head: Literal["stages", "apfc"] = "stages"
    ce_aux_weight: float = Field(1.0, ge=0.0)  # α
    kl_same_stage_weight: float = Field(1.0, ge=0.0)  # β
    kl_cross_stage_weight: float = Field(1.0, ge=0.0)  # γ


@register_distiller("dcm")
class DCM(Distiller):
    """Two networks with auxiliary classifiers distilling densely across layers (see the module docstring)."""

    Options = DCMOptions
    capabilities = Capabilities(requires_teacher=False)

    def __init__(
        self, student: nn.Module, teacher: nn.Module | None, options: DCMOptions, context: DistillContext
    ) -> None:
        super().__init__(student, None, options, context)
        self.peers = nn.ModuleList([build_peer(context, options.peer, "dcm")])
        self.archs = [context.student_arch, options.peer or context.student_arch]
        sample = context.sample_input
        found: list[AuxHeads] = [
            build_aux_heads(net, context.num_classes, sample, options.aux_head)
            for net in (student, self.peers[0])
        ]
        self.heads = nn.ModuleList(h.heads for h in found)
        self.head_points = [h.points for h in found]
        self.head_family = [h.family for h in found]
        self._cohort_taps = [FeatureTap(net, list(h.points.values())) for net, h in zip(self.nets(), found)]

    def nets(self) -> list[nn.Module]:
        return [self.student, self.peers[0]]

    def networks(self) -> dict[str, nn.Module]:
        return {"net1": self.student, "net2": self.peers[0]}

    def network_arch(self, name: str) -> str | None:
        return {"net1": self.archs[0], "net2": self.archs[1]}.get(name)

    def outputs(self, images: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Each network's ``(C3, C2, C1)`` logits, network 1 first."""
        outs = []
        for tap, heads, points in zip(self._cohort_taps, self.heads, self.head_points):
            logits, feats = self.tapped(tap, images)
            outs.append((heads["C3"](feats[points["C3"]]), heads["C2"](feats[points["C2"]]), logits))
        return outs

    def compute(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        index: torch.Tensor | None = None,
        ctx: StepContext | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.options
        outs1, outs2 = self.outputs(images)
        terms = dcm_losses(
            outs1, outs2, labels, o.ce_aux_weight, o.kl_same_stage_weight, o.kl_cross_stage_weight
        )
        with torch.no_grad():
            for name, outs in (("net1", outs1), ("net2", outs2)):
                for c, z in zip(CLASSIFIERS, outs):
                    self.metrics[f"train_top1.{name}.{c}"] = (z.argmax(1) == labels).float().mean() * 100.0
        return outs1[-1], terms

    def describe(self) -> dict:
        info = super().describe()
        info["networks"] = {
            name: {
                "arch": self.network_arch(name),
                "params": sum(p.numel() for p in net.parameters()),
                "aux_family": self.head_family[i],
                "heads": {
                    c: {"branch": self.head_points[i][c], "params": sum(p.numel() for p in h.parameters())}
                    for c, h in self.heads[i].items()
                },
            }
            for i, (name, net) in enumerate(self.networks().items())
        }
        info["modules"] = {
            f"heads.{name}.{c}": sum(p.numel() for p in h.parameters())
            for name, heads in zip(self.networks(), self.heads)
            for c, h in heads.items()
        }
        return info
