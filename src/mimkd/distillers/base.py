"""The Distiller contract (design.md).

A :class:`Distiller` is an ``nn.Module`` that holds the student, the frozen teacher (eval mode, no gradient,
never in the optimiser, never in weight decay) and the method's own trainable parts (critics, connectors,
projection heads, memory banks as buffers). Its ``forward(images, labels, index)`` returns the student's
logits and a dict of named, already weighted loss terms; the trainer sums the dict and logs every term.
Unweighted diagnostics (e.g. MI estimates in nats) go to ``self.metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from mimkd.features import FeatureSpec, FeatureTap, feature_points_of

__all__ = ["Distiller", "DistillContext", "MethodOptions", "InitStage", "freeze"]


class MethodOptions(BaseModel):
    """Base class of every method's typed options (unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


@dataclass
class DistillContext:
    """What a method may need to know about the data besides the two networks."""

    sample_input: torch.Tensor
    num_classes: int
    num_samples: int | None = None  # size of the training set (memory banks)
    train_labels: torch.Tensor | None = None  # class-aware negative sampling (CRD, MIMKD); None for KDEP
    # Builds another network by architecture name (zoo name or ``package.module:factory``) for the data's
    # classes and channels: the peers of DML/DCM. ``student_arch`` names the student's architecture.
    build_network: Callable[[str], nn.Module] | None = None
    student_arch: str | None = None


@dataclass
class InitStage:
    """A training stage that runs before the main one (FitNets hints, AB/FT/FSP initialisation, ...).

    The trainer optimises ``modules`` alone for ``epochs`` epochs with ``loss_fn(images, index) -> {term:
    loss}`` (labels are never passed). ``student_train_mode`` says whether the student runs in train mode.
    """

    name: str
    epochs: int
    modules: list[nn.Module]
    loss_fn: Any
    lr: float | None = None
    student_train_mode: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode and stop its parameters from requiring gradients."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class Distiller(nn.Module):
    """Base class of every distillation method.

    Subclasses set ``name`` (via the registry decorator) and ``Options``, and implement :meth:`compute`.
    ``requires_teacher`` is False only for methods that train without one (vanilla, DML, DCM).

    Optional hooks the trainer calls without naming the method:

    * :meth:`networks` — every network the trainer evaluates and checkpoints (DML/DCM train a cohort; the
      first one is ``self.student``, the one exported). Auxiliary parts (DCM's extra classifiers) are not
      networks: they live in the method state and are dropped at test time and export.
    * :meth:`offline_ready` / :meth:`offline_pass` — statistics a method computes once over the training
      images before any training (KDEP's SVD of the teacher's features).
    * :meth:`init_stages` — training stages that precede the main one (FitNets hints, AB/FT/FSP).
    """

    name: ClassVar[str] = "?"
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    requires_teacher: ClassVar[bool] = True
    uses_labels: ClassVar[bool] = True  # False: the method never reads labels (KDEP)

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        options: MethodOptions,
        context: DistillContext,
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = freeze(teacher) if teacher is not None else None
        self.options = options
        self.context_num_classes = context.num_classes
        self.metrics: dict[str, torch.Tensor] = {}
        self._taps: dict[str, FeatureTap] = {}

    # -- modes and parameters -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every parameter the optimiser must update: student and method parts, never the teacher."""
        for name, p in self.named_parameters():
            if name.startswith("teacher.") or not p.requires_grad:
                continue
            yield name, p

    def schedule_warnings(self, visits: float) -> list[str]:
        """Warnings about the run's schedule, given how often it shows each training sample (``visits``):
        collected from the method's parts that define ``schedule_warnings`` (the memory-bank contrast of
        CRD, WCoRD and MIMKD), each prefixed with the method's name. The trainer warns before training."""
        out = []
        for name, m in self.named_modules():
            if name and hasattr(m, "schedule_warnings"):
                out += [f"method {self.name}: {w}" for w in m.schedule_warnings(visits)]
        return out

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter-name prefix (e.g. ``{"local_critic.": 10.0}``); the
        trainer gives each such parameter ``scale × lr`` at every step. Empty by default."""
        return {}

    def method_state_dict(self) -> dict[str, torch.Tensor]:
        """State of the method's own parts (critics, heads, banks): everything but student and teacher."""
        return {
            k: v
            for k, v in self.state_dict().items()
            if not (k.startswith("student.") or k.startswith("teacher."))
        }

    def load_method_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.method_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            from mimkd.errors import CheckpointError

            raise CheckpointError(
                f"method state of {self.name!r} does not match the checkpoint: missing {missing[:8]}, "
                f"unexpected {unexpected[:8]} (was the run started with other method options?)"
            )
        self.load_state_dict({**self.state_dict(), **state})

    def init_stages(self) -> list[InitStage]:
        """Stages the trainer runs before the main training (none by default)."""
        return []

    def networks(self) -> dict[str, nn.Module]:
        """The networks the trainer evaluates and checkpoints, by name; the first is the student."""
        return {"student": self.student}

    def network_arch(self, name: str) -> str | None:
        """Architecture name of a network other than the student (recorded in its checkpoint)."""
        return None

    def offline_ready(self) -> bool:
        """False while the method still needs its :meth:`offline_pass` (state restored by a resume counts)."""
        return True

    def offline_pass(self, batches: Iterable[torch.Tensor], num_batches: int, run_dir: Path) -> None:
        """Compute statistics over the training images (normalised, not augmented, no labels) before the
        training starts. ``run_dir`` is where a method may store a reusable copy of what it computed."""

    # -- features ---------------------------------------------------------------------------------------
    def tap(self, which: str, points: list[str] | None, sample_input: torch.Tensor | None) -> FeatureTap:
        """Create (once) a FeatureTap on the student or the teacher for ``points``."""
        net = self.student if which == "student" else self.teacher
        tap = FeatureTap(net, points, sample_input=sample_input)
        self._taps[which] = tap
        return tap

    @staticmethod
    def points_of(net: nn.Module, sample_input: torch.Tensor, override: list[str] | None = None):
        return feature_points_of(net, sample_input) if override is None else override

    @staticmethod
    def probe(tap: FeatureTap, sample_input: torch.Tensor) -> dict[str, FeatureSpec]:
        return {s.name: s for s in tap.specs(sample_input)}

    def teacher_outputs(self, images: torch.Tensor, tap: FeatureTap | None = None):
        """Teacher logits (and features when a tap is given), without autograd."""
        assert self.teacher is not None
        with torch.no_grad():
            if tap is None:
                return self.teacher(images), {}
            return tap.run(images)

    # -- the contract -----------------------------------------------------------------------------------
    def forward(
        self, images: torch.Tensor, labels: torch.Tensor | None, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.metrics = {}
        return self.compute(images, labels, index)

    def compute(
        self, images: torch.Tensor, labels: torch.Tensor | None, index: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What ``mimkd describe`` prints about the method's parts (override to add details)."""
        return {"method": self.name, "options": self.options.model_dump()}

    @staticmethod
    def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0):
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
