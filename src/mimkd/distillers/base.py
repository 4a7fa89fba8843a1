"""The Distiller contract (docs/architecture.md).

A :class:`Distiller` is an ``nn.Module`` that holds the student, the frozen teacher (eval mode, no gradient,
never in the optimiser, never in weight decay) and the method's own trainable parts (critics, connectors,
projection heads, memory banks as buffers). Its ``forward(images, labels, index, ctx)`` returns the student's
logits and a dict of named, already weighted loss terms; the trainer sums the dict and logs every term.
``ctx`` is the :class:`~mimkd.distillers.step_context.StepContext` of the step (where training is), so a
method's warm-up or schedule is its own business. Unweighted diagnostics (e.g. MI estimates in nats) go to
``self.metrics``. What a method needs from the trainer is declared once, in its :class:`Capabilities`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

from mimkd.errors import CheckpointError
from mimkd.features import FeatureTap

from .step_context import StepContext, accepts_context

__all__ = [
    "Capabilities",
    "Distiller",
    "DistillContext",
    "MethodOptions",
    "InitStage",
    "StepContext",
    "freeze",
]

_NETWORKS = ("student.", "teacher.")  # state-dict prefixes of the two networks every distiller holds


@dataclass(frozen=True)
class Capabilities:
    """What a method needs from the trainer, declared in one place (``capabilities = Capabilities(...)``).

    Attributes:
        requires_teacher: the method distils from a teacher (False: vanilla, DML, DCM).
        uses_labels: its batches carry labels (False: the labels are never loaded, KDEP pre-training).
        evaluated: the trainer measures its networks' test accuracy (False: a pre-training whose classifier
            is untrained).
        views: extra augmented views of each training batch the method reads (names registered in
            :mod:`mimkd.data.views`, e.g. ``("strong",)`` for MLKD); ``compute`` reads them with
            :meth:`Distiller.view`. The primary view (the run's augmentation) is always ``images``.
    """

    requires_teacher: bool = True
    uses_labels: bool = True
    evaluated: bool = True
    views: tuple[str, ...] = ()


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

    The trainer optimises ``modules`` alone for ``epochs`` epochs with ``loss_fn(images, index, ctx) ->
    {term: loss}`` (labels are never passed; ``ctx`` is the stage's :class:`StepContext`, stage ``name``).
    ``student_train_mode`` says whether the student runs in train mode.
    """

    name: str
    epochs: int
    modules: list[nn.Module]
    loss_fn: Any
    lr: float | None = None
    student_train_mode: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@functools.lru_cache(maxsize=256)
def _takes_context(compute: Callable[..., Any]) -> bool:
    return accepts_context(compute, 4)


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode and stop its parameters from requiring gradients."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


class Distiller(nn.Module):
    """Base class of every distillation method.

    Subclasses set ``name`` (via the registry decorator), ``Options`` and, where they differ from the
    defaults, ``capabilities``, and implement :meth:`compute`. ``requires_teacher``, ``uses_labels`` and
    ``evaluated`` are read-only mirrors of ``capabilities`` (set when the class is defined).

    Optional hooks the trainer calls without naming the method:

    * :meth:`networks` — every network the trainer evaluates and checkpoints (DML/DCM train a cohort; the
      first one is ``self.student``, the one exported). Auxiliary parts (DCM's extra classifiers) are not
      networks: they live in the method state and are dropped at test time and export.
    * :meth:`offline_ready` / :meth:`offline_pass` — statistics a method computes once over the training
      images before any training (KDEP's SVD of the teacher's features).
    * :meth:`init_stages` — training stages that precede the main one (FitNets hints, AB/FT/FSP).
    * :meth:`ddp_ignored_names` — state DistributedDataParallel must not synchronise (the teacher; each
      rank's own memory banks).
    * :meth:`schedule_warnings`, :meth:`lr_scales` — warnings about a schedule; per-part learning rates.
    """

    name: ClassVar[str] = "?"
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    capabilities: ClassVar[Capabilities] = Capabilities()
    requires_teacher: ClassVar[bool] = True  # mirrors of ``capabilities`` (do not set them directly)
    uses_labels: ClassVar[bool] = True
    evaluated: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        caps = cls.__dict__.get("capabilities")
        for flag in ("requires_teacher", "uses_labels", "evaluated"):
            if flag in cls.__dict__:
                raise TypeError(f"{cls.__name__}: declare {flag} in capabilities = Capabilities(...)")
            if caps is not None:
                setattr(cls, flag, getattr(caps, flag))

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
        self._views: Mapping[str, torch.Tensor] = {}

    # -- modes and parameters -------------------------------------------------------------------------
    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def trainable_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every parameter the optimiser must update: student and method parts, never the teacher."""
        for name, p in self.named_parameters():
            if self.is_teacher_state(name) or not p.requires_grad:
                continue
            yield name, p

    @staticmethod
    def is_teacher_state(name: str) -> bool:
        """Whether a parameter/buffer name of this distiller's state belongs to the frozen teacher."""
        return name.startswith("teacher.")

    @staticmethod
    def is_method_state(name: str) -> bool:
        """Whether a state name belongs to the method's own parts (neither the student nor the teacher)."""
        return not name.startswith(_NETWORKS)

    def method_parts(self) -> dict[str, nn.Module]:
        """The method's own direct child modules (critics, heads, connectors), not the networks."""
        nets = [id(n) for n in self.networks().values()]
        return {
            name: child
            for name, child in self.named_children()
            if name not in ("student", "teacher") and id(child) not in nets
        }

    def convert_method_parts(self, fn: Callable[[nn.Module], nn.Module]) -> None:
        """Replace each of :meth:`method_parts` by ``fn(part)`` (e.g. SyncBatchNorm conversion)."""
        for name, child in self.method_parts().items():
            setattr(self, name, fn(child))

    def ddp_ignored_names(self) -> list[str]:
        """Parameter and buffer names DistributedDataParallel must leave alone: the frozen teacher's and the
        buffers of every part that declares ``ddp_local_buffers()`` (each rank's own memory banks)."""
        names = [n for n, _ in self.named_parameters() if self.is_teacher_state(n)]
        names += [n for n, _ in self.named_buffers() if self.is_teacher_state(n)]
        for prefix, module in self.named_modules():
            local = getattr(module, "ddp_local_buffers", None)
            if prefix and callable(local):
                names += [f"{prefix}.{n}" for n in local()]
        return names

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
        return {k: v for k, v in self.state_dict().items() if self.is_method_state(k)}

    def load_method_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = self.method_state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
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
    # Every feature method reads its features through these two calls: one scoped capture per forward
    # (FeatureTap.capture), the tap emptied right after, so no hook records outside a step and no activation
    # outlives it (evaluation, export and compiled networks see plain modules).
    @staticmethod
    def tapped(
        tap: FeatureTap, images: torch.Tensor, *, grad: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One forward of ``tap``'s network on ``images``: its output and the captured features."""
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            out, feats = tap.run(images)
        tap.clear()
        return out, feats

    def teacher_outputs(self, images: torch.Tensor, tap: FeatureTap | None = None):
        """Teacher logits (and features when a tap is given), without autograd."""
        assert self.teacher is not None
        if tap is None:
            with torch.no_grad():
                return self.teacher(images), {}
        return self.tapped(tap, images, grad=False)

    def student_teacher_features(
        self, images: torch.Tensor, s_tap: FeatureTap, t_tap: FeatureTap
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        """Student logits and features (with autograd), teacher logits and features (without)."""
        logits, fs = self.tapped(s_tap, images)
        t_logits, ft = self.teacher_outputs(images, t_tap)
        return logits, fs, t_logits, ft

    # -- the contract -----------------------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        index: torch.Tensor | None = None,
        ctx: StepContext | None = None,
        views: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The step's logits and weighted terms; ``ctx`` defaults to :meth:`StepContext.standalone`;
        ``views`` holds the extra views the method declares (``{name: images}``, read with :meth:`view`)."""
        self.metrics = {}
        self._views = views or {}
        try:
            # compute(images, labels, index) from before StepContext: still called, without the context
            # (checked per function, so a compute replaced on the class later is judged by its own signature)
            if not _takes_context(type(self).compute):
                return self.compute(images, labels, index)  # type: ignore[call-arg]
            return self.compute(images, labels, index, ctx if ctx is not None else StepContext.standalone())
        finally:
            self._views = {}

    def view(self, name: str) -> torch.Tensor:
        """This step's extra view ``name`` (declared in ``capabilities.views``), as the trainer passed it."""
        if name not in self.capabilities.views:
            raise TypeError(
                f"{type(self).__name__} reads view {name!r}: declare it in Capabilities(views=...)"
            )
        out = self._views.get(name)
        if out is None:
            raise ValueError(
                f"method {self.name!r} needs the {name!r} view of each batch: the trainer passes it; in "
                f"your own loop call distiller(images, labels, views={{{name!r}: {name}_images}}) with "
                f"mimkd.data.views.build_views([{name!r}], augment)"
            )
        return out

    def compute(
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        index: torch.Tensor | None,
        ctx: StepContext,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The method's loss terms for one batch at position ``ctx`` (subclasses implement it)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What ``mimkd describe`` prints about the method's parts (override to add details)."""
        return {"method": self.name, "options": self.options.model_dump()}

    @staticmethod
    def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0):
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
