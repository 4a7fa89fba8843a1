"""Initialisation stages declared by a method (spec §2.1): AB, FT and FSP initialisation, FitNets' hint stage.

Before the main training the trainer runs each :class:`~mimkd.distillers.base.InitStage` for its epochs: a
separate SGD (the run's momentum, Nesterov flag and weight decay; the stage's lr, else the run's base lr,
constant) over the stage's modules only, on the stage's loss (labels are never read). As RepDistiller does,
the whole distiller is put in eval mode and then the stage's modules in train mode (the teacher stays in eval
mode); the student is back in train mode when the main training starts.

Progress (stage, epoch, step, the stage optimiser) is part of ``last.pt``, and the stage's batches are a
pure function of (seed, stage, epoch, step), so an interrupted run resumes inside a stage exactly like the
main loop.

A stage step is a :class:`~mimkd.engine.step.TrainStep` (the run's precision; the non-finite check reads a
flag each step). Under torchrun each rank takes its slice of the stage's global batch and the stage's
gradients are averaged over the ranks after the backward (the stage's modules are trained outside DDP).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from mimkd.data import BatchIterator
from mimkd.distillers.base import InitStage

from .distributed import all_reduce_gradients
from .logging import LaggedScalars, Meter, MetricsLog, NullLog, progress_bar
from .step import TrainStep

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["InitProgress", "run_init_stages"]

_SEED_STRIDE = 1_000_003  # each stage draws its own batch order


class InitProgress:
    """Where the run is in its init stages; saved in ``last.pt`` under ``"init"``."""

    def __init__(self) -> None:
        self.done = 0  # stages completed
        self.epoch = 0  # epochs completed in the current stage
        self.step = 0  # steps done in the current epoch
        self.optimizer_state: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "epoch": self.epoch, "step": self.step, "optimizer": self.optimizer_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.done, self.epoch, self.step = state["done"], state["epoch"], state["step"]
        self.optimizer_state = state.get("optimizer")


def _parameters(stage: InitStage) -> list[torch.nn.Parameter]:
    seen: dict[int, torch.nn.Parameter] = {}
    for m in stage.modules:
        for p in m.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def _stage_modes(trainer: Trainer, stage: InitStage) -> None:
    d = trainer.distiller
    d.eval()
    for m in stage.modules:
        m.train()
    if stage.student_train_mode:
        d.student.train()
    if d.teacher is not None:
        d.teacher.eval()


def run_init_stages(trainer: Trainer, log: MetricsLog | NullLog) -> None:
    """Run (or finish, after a resume) every init stage of the trainer's distiller."""
    stages = trainer.distiller.init_stages()
    progress: InitProgress = trainer.init_progress
    cfg = trainer.cfg
    while progress.done < len(stages):
        index = progress.done
        stage = stages[index]
        o = cfg.optim
        params = _parameters(stage)
        optimizer = torch.optim.SGD(
            params,
            lr=stage.lr or float(o.lr),
            momentum=o.momentum or 0.0,
            nesterov=bool(o.nesterov),
            weight_decay=o.weight_decay or 0.0,
        )
        if progress.optimizer_state is not None:
            optimizer.load_state_dict(progress.optimizer_state)
        trainer.init_optimizer = optimizer
        iterator = BatchIterator(
            trainer.train_set,
            o.batch_size,
            shuffle=True,
            drop_last=True,
            seed=cfg.seed + _SEED_STRIDE * (index + 1),
            device=trainer.device,
            augment=trainer.augment,
            with_labels=False,
            rank=trainer.dist.rank,
            world_size=trainer.dist.world_size,
            storage_device=trainer.storage,
        )
        step = TrainStep(
            _stage_forward(stage),
            optimizer,
            precision=cfg.train.precision,
            check="step",
            on_nonfinite=cfg.train.on_nonfinite,
            max_skipped=cfg.train.max_skipped_batches,
            grad_sync=(lambda ps=params: all_reduce_gradients(ps)) if trainer.dist.enabled else None,
        )
        step.load_skipped(trainer.skipped)
        spe = min(len(iterator), trainer.steps_per_epoch)
        while progress.epoch < stage.epochs:
            _stage_epoch(trainer, stage, index, iterator, step, spe, log)
        progress.done += 1
        progress.epoch = progress.step = 0
        progress.optimizer_state = None
        trainer.init_optimizer = None
        trainer.save()


def _stage_forward(stage: InitStage):
    """The stage's loss as a TrainStep model: ``(images, labels, index) -> (None, terms)``."""

    def forward(images, labels, index):
        return None, stage.loss_fn(images, index)

    return forward


def _stage_epoch(trainer, stage, index, iterator, step: TrainStep, spe, log) -> None:
    progress: InitProgress = trainer.init_progress
    optimizer = step.optimizer
    _stage_modes(trainer, stage)
    meter = Meter()
    shown = LaggedScalars()
    t0, seen = time.time(), 0
    desc = f"init {stage.name} {progress.epoch + 1}/{stage.epochs}"
    bar = progress_bar(spe, desc, trainer.cfg.train.progress if trainer.is_main else False, progress.step)
    try:
        for batch in iterator.epoch(progress.epoch, start_step=progress.step):
            if progress.step >= spe:
                break
            images = batch.images.contiguous(memory_format=trainer.memory_format)
            out = step(images, None, batch.index, position=(-1, progress.step))
            if not out.applied:
                trainer._after_refusal(step.status())
                progress.step += 1
                continue
            values = {f"loss.{k}": v for k, v in out.terms.items()} | {"loss.total": out.total}
            meter.add(values, images.shape[0])
            progress.step += 1
            seen += images.shape[0]
            if not bar.disable:
                shown.push({k[5:]: v for k, v in values.items()})
                bar.set_postfix({k: f"{v:.4f}" for k, v in (shown.latest() or {}).items()}, refresh=False)
            bar.update(1)
            if progress.step % trainer.cfg.train.checkpoint_every_steps == 0 and progress.step < spe:
                progress.optimizer_state = optimizer.state_dict()
                trainer.save()
    finally:
        bar.close()
    record = {"stage": stage.name, "stage_index": index, "stage_epoch": progress.epoch}
    record |= {f"init.{k}": v for k, v in meter.reduced().means().items()}
    record["init.images_per_s"] = seen * trainer.dist.world_size / max(time.time() - t0, 1e-9)
    log.write(record, trainer.global_step)
    progress.epoch += 1
    progress.step = 0
    progress.optimizer_state = optimizer.state_dict()
    trainer.save()
