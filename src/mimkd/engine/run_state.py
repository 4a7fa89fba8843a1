"""What a run is made of (:class:`RunSetup`, fixed when it starts) and where it is (:class:`RunState`).

The trainer, the init stages, checkpointing and the summary read these two objects, never each other's
attributes: ``last.pt`` holds :meth:`RunState.state_dict` (with the weights and the optimiser), a resume
loads it back, and ``summary.json`` is built from a setup, a state and the epoch records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mimkd.config import RunConfig
from mimkd.data import ImageDataset
from mimkd.distillers.base import Distiller
from mimkd.distillers.step_context import MAIN, StepContext

from .distributed import DistInfo
from .logging import Meter

__all__ = ["InitProgress", "RunSetup", "RunState", "StudentInfo"]


@dataclass
class StudentInfo:
    """What a checkpoint records about the student so it can be rebuilt (and used as a teacher)."""

    arch: str
    num_classes: int
    in_channels: int


@dataclass(frozen=True)
class RunSetup:
    """The fixed facts of a run: its configuration, its parts and how its steps run."""

    cfg: RunConfig
    distiller: Distiller
    train_set: ImageDataset
    augment: Any
    device: torch.device
    storage: torch.device  # where the uint8 training images live (``train.data_on_device``)
    dist: DistInfo
    memory_format: torch.memory_format
    steps_per_epoch: int
    check: str  # the resolved ``train.nonfinite_check``
    lr_factor: float  # ``optim.scale_lr``: the world size, else 1
    student_info: StudentInfo

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def evaluated(self) -> bool:
        """Whether the run measures test accuracy (a label-free pre-training does not)."""
        return self.distiller.evaluated

    def input_spec(self) -> dict[str, Any]:
        """What the student's input must be: ``shape`` (C, H, W) and the normalisation it was trained with
        (``x = (pixels / 255 - mean) / std`` per channel); recorded in every checkpoint (export, probes)."""
        ds = self.train_set
        return {"shape": list(ds.image_shape), "mean": list(ds.mean), "std": list(ds.std), "data": ds.name}

    def main_context(self, epoch: int, step: int) -> StepContext:
        """The :class:`StepContext` of the main stage at (``epoch``, ``step``)."""
        return StepContext(MAIN, epoch, step, self.steps_per_epoch, max(self.cfg.optim.epochs, 1))


class InitProgress:
    """Where the run is in its init stages; saved in ``last.pt`` under ``"init"``."""

    def __init__(self) -> None:
        self.done = 0  # stages completed
        self.epoch = 0  # epochs completed in the current stage
        self.step = 0  # steps done in the current epoch
        self.optimizer_state: dict[str, Any] | None = None
        self.optimizer: torch.optim.Optimizer | None = None  # the running stage's (its state is saved)

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is not None:
            self.optimizer_state = self.optimizer.state_dict()
        return {"done": self.done, "epoch": self.epoch, "step": self.step, "optimizer": self.optimizer_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done, self.epoch, self.step = state["done"], state["epoch"], state["step"]
        self.optimizer_state = state.get("optimizer")


def _no_best() -> dict[str, Any]:
    return {"epoch": -1, "top1": -1.0, "top5": 0.0}


@dataclass
class RunState:
    """The mutable position and records of a run (everything ``last.pt`` holds besides the tensors)."""

    epoch: int = 0
    step: int = 0  # steps done in ``epoch``
    global_step: int = 0  # applied main-stage steps of the whole run
    best: dict[str, Any] = field(default_factory=_no_best)
    best_networks: dict[str, dict[str, Any]] = field(default_factory=dict)  # DML/DCM peers' best epochs
    skipped: int = 0
    wall_before: float = 0.0  # wall time of earlier sessions of this run (resume)
    init: InitProgress = field(default_factory=InitProgress)
    meter: Meter = field(default_factory=Meter)
    grad_meter: Meter = field(default_factory=Meter)  # the epoch's logged steps of train.log_term_grads

    def position(self) -> dict[str, Any]:
        """The counters and records a checkpoint stores (the meters are stored by the trainer: summed over
        the ranks first)."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "best": dict(self.best),
            "best_networks": {k: dict(v) for k, v in self.best_networks.items()},
            "skipped": self.skipped,
            "init": self.init.state_dict(),
        }

    def load_position(self, ck: dict[str, Any], init_stages: int) -> None:
        """Restore what :meth:`position` stored (``init_stages``: how many the method declares, all done
        for a checkpoint written before init stages existed)."""
        self.epoch, self.step, self.global_step = ck["epoch"], ck["step"], ck["global_step"]
        self.best = ck["best"]
        self.best_networks = ck.get("best_networks", {})
        self.skipped = ck.get("skipped", 0)
        if "init" in ck:
            self.init.load_state_dict(ck["init"])
        else:
            self.init.done = init_stages
        self.wall_before = float(ck.get("wall_time", 0.0))

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step = 0
        self.meter = Meter()
        self.grad_meter = Meter()
