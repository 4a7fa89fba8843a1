"""``dml``: Deep Mutual Learning (Zhang et al., CVPR 2018; docs/methods/dml.md): a cohort trained together.

Network ``k`` of a cohort of ``K`` minimises ``L_k = CE(z_k, y) + Σ_{l≠k} KL(p_l ‖ p_k)`` with
``KL = mean_b Σ_c p_l log((p_l + 1e-8)/(p_k + 1e-8))`` at temperature 1, the peers' probabilities detached
(each network is optimised over its own parameters only; the peers' predictions act as constants). The
distiller owns the cohort: ``self.student`` is network 1 (``net1``, the one exported); the peers (``net2``,
...) are built by ``context.build_network(arch)``, each initialised by its own constructor from the global
RNG, and live in ``self.peers`` so their weights are part of the method state and of the optimiser.

Options: ``peers`` (architecture names; empty: ``cohort_size − 1`` copies of the student's architecture),
``cohort_size`` (2), ``peer_average`` (False: sum over peers, as the official code; True: the paper's
``1/(K−1)`` average; identical for K = 2), ``kl_weight`` (1), ``label_smoothing`` (0; the official re-ID
recipe uses 0.1).

Deviations from the reference (docs/methods/dml.md):

* Simultaneous update: the terms of all networks are summed and one optimiser takes one step. Because every
  peer term is detached, each network receives exactly the gradient of its own ``L_k`` at the current
  weights; the original alternates (update net 1, re-predict, update net 2), so net 2's KL there sees net 1's
  already-updated prediction (and, through the TF input queue, a fresh batch). No alternating mode is offered.
* One optimiser (and one learning-rate schedule and weight decay) for the whole cohort, the recipe's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field

from mimkd.errors import MethodError

from .base import Capabilities, DistillContext, Distiller, MethodOptions, StepContext
from .registry import register_distiller

__all__ = ["DML", "DMLOptions", "build_peer", "dml_kl", "dml_losses"]

EPS = 1e-8


def dml_kl(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``KL(p_l ‖ p_k) = mean_b Σ_c p_l log((p_l + 1e-8)/(p_k + 1e-8))``, ``p_l = softmax(target_logits)``
    detached (the peer), ``p_k = softmax(logits)`` (the network being trained), T = 1."""
    p_l = F.softmax(target_logits.detach().float(), dim=1)
    p_k = F.softmax(logits.float(), dim=1)
    return (p_l * (torch.log(p_l + EPS) - torch.log(p_k + EPS))).sum(dim=1).mean()


def dml_losses(
    logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    peer_average: bool = False,
    kl_weight: float = 1.0,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Every network's terms: ``ce.net{k}`` and ``kl.net{k}`` (``kl_weight · Σ_{l≠k} KL(p_l ‖ p_k)``, divided
    by ``K − 1`` when ``peer_average``). Their sum is ``Σ_k L_k``."""
    k_nets = len(logits)
    if k_nets < 2:
        raise ValueError(f"DML needs at least 2 networks, got {k_nets}")
    terms: dict[str, torch.Tensor] = {}
    for k, z in enumerate(logits):
        terms[f"ce.net{k + 1}"] = F.cross_entropy(z.float(), labels, label_smoothing=label_smoothing)
        kl = sum(dml_kl(logits[l], z) for l in range(k_nets) if l != k)
        scale = kl_weight / (k_nets - 1) if peer_average else kl_weight
        terms[f"kl.net{k + 1}"] = scale * kl
    return terms


def build_peer(context: DistillContext, arch: str | None, method: str) -> nn.Module:
    """A peer network of architecture ``arch`` (None: the student's) built by ``context.build_network``."""
    arch = arch or context.student_arch
    if arch is None:
        raise MethodError(
            f"{method}: the peer's architecture is unknown: name it in the method options (e.g. "
            f"method.{'peers=[resnet8]' if method == 'dml' else 'peer=resnet8'}) or pass student_arch= to "
            "build_distiller so peers of the student's own architecture can be built"
        )
    if context.build_network is None:
        raise MethodError(
            f"{method}: cannot build the peer network {arch!r}: no build_network was given (pass "
            "build_network=lambda arch: ... to build_distiller, or use mimkd distill)"
        )
    return context.build_network(arch)


class DMLOptions(MethodOptions):
    peers: list[str] = Field(default_factory=list)
    cohort_size: int = Field(2, ge=2)
    peer_average: bool = False
    kl_weight: float = Field(1.0, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)


@register_distiller("dml")
class DML(Distiller):
    """A cohort of networks that teach each other (see the module docstring); no teacher."""

    Options = DMLOptions
    capabilities = Capabilities(requires_teacher=False)

    def __init__(
        self, student: nn.Module, teacher: nn.Module | None, options: DMLOptions, context: DistillContext
    ) -> None:
        super().__init__(student, None, options, context)
        o = options
        if o.peers and "cohort_size" in o.model_fields_set and o.cohort_size != len(o.peers) + 1:
            raise MethodError(
                f"dml: method.cohort_size={o.cohort_size} but {len(o.peers)} peer(s) were named "
                f"(a cohort of {len(o.peers) + 1}); drop cohort_size or make it match"
            )
        archs: list[str | None] = list(o.peers) or [None] * (o.cohort_size - 1)
        self.peers = nn.ModuleList(build_peer(context, a, "dml") for a in archs)
        self.archs = [context.student_arch, *(a or context.student_arch for a in archs)]

    def networks(self) -> dict[str, nn.Module]:
        return {f"net{i + 1}": net for i, net in enumerate([self.student, *self.peers])}

    def network_arch(self, name: str) -> str | None:
        i = int(name.removeprefix("net")) - 1 if name.startswith("net") else -1
        return self.archs[i] if 0 <= i < len(self.archs) else None

    def outputs(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every network's logits, network 1 first."""
        return [net(images) for net in self.networks().values()]

    def compute(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        index: torch.Tensor | None = None,
        ctx: StepContext | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.options
        logits = self.outputs(images)
        terms = dml_losses(logits, labels, o.peer_average, o.kl_weight, o.label_smoothing)
        with torch.no_grad():
            for k, z in enumerate(logits):
                self.metrics[f"train_top1.net{k + 1}"] = (z.argmax(1) == labels).float().mean() * 100.0
        return logits[0], terms

    def describe(self) -> dict:
        info = super().describe()
        info["networks"] = {
            name: {"arch": self.network_arch(name), "params": sum(p.numel() for p in net.parameters())}
            for name, net in self.networks().items()
        }
        return info
