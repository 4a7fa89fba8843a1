"""Initialisation stages declared by a method: AB, FT and FSP initialisation, FitNets' hint stage, MIMKD's
critic warm-up (docs/methods/).

Before the main training the trainer runs each :class:`~mimkd.distillers.base.InitStage` for its epochs: a
separate SGD (the run's momentum, Nesterov flag and weight decay; the stage's lr, else the run's base lr,
constant) over the stage's modules only, on the stage's loss (labels are never read). As RepDistiller does,
the whole distiller is put in eval mode and then the stage's modules in train mode (the teacher stays in eval
mode); the student is back in train mode when the main training starts.

Progress (stage, epoch, step, the stage optimiser) is part of ``last.pt``, and the stage's batches are a
pure function of (seed, stage, epoch, step), so an interrupted run resumes inside a stage exactly like the
main loop.

A stage's epochs run through the same :class:`~mimkd.engine.loop.EpochLoop` as the main training; a stage
step is a :class:`~mimkd.engine.step.TrainStep` (the run's precision; the non-finite check reads a flag each
step) and its loss receives the stage's :class:`~mimkd.distillers.step_context.StepContext` (stage name,
epoch, step). Under torchrun each rank takes its slice of the stage's global batch and the stage's
gradients are averaged over the ranks after the backward (the stage's modules are trained outside DDP).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mimkd.data import BatchIterator
from mimkd.distillers.base import InitStage
from mimkd.distillers.step_context import StepContext, accepts_context

from .distributed import all_reduce_gradients
from .logging import Meter, MetricsLog, NullLog
from .loop import EpochLoop, RunClock
from .run_state import InitProgress, RunSetup, RunState
from .step import NonFiniteStatus, TrainStep

__all__ = ["InitProgress", "run_init_stages"]

_SEED_STRIDE = 1_000_003  # each stage draws its own batch order


def _parameters(stage: InitStage) -> list[torch.nn.Parameter]:
    seen: dict[int, torch.nn.Parameter] = {}
    for m in stage.modules:
        for p in m.parameters():
            if p.requires_grad:
                seen.setdefault(id(p), p)
    return list(seen.values())


def _stage_modes(setup: RunSetup, stage: InitStage) -> None:
    d = setup.distiller
    d.eval()
    for m in stage.modules:
        m.train()
    if stage.student_train_mode:
        d.student.train()
    if d.teacher is not None:
        d.teacher.eval()


def _stage_optimizer(setup: RunSetup, stage: InitStage, progress: InitProgress) -> torch.optim.SGD:
    o = setup.cfg.optim
    optimizer = torch.optim.SGD(
        _parameters(stage),
        lr=stage.lr or float(o.lr),
        momentum=o.momentum or 0.0,
        nesterov=bool(o.nesterov),
        weight_decay=o.weight_decay or 0.0,
    )
    if progress.optimizer_state is not None:
        optimizer.load_state_dict(progress.optimizer_state)
    return optimizer


def _stage_iterator(setup: RunSetup, index: int) -> BatchIterator:
    return BatchIterator(
        setup.train_set,
        setup.cfg.optim.batch_size,
        shuffle=True,
        drop_last=True,
        seed=setup.cfg.seed + _SEED_STRIDE * (index + 1),
        device=setup.device,
        augment=setup.augment,
        with_labels=False,
        rank=setup.dist.rank,
        world_size=setup.dist.world_size,
        storage_device=setup.storage,
    )


def run_init_stages(
    setup: RunSetup,
    state: RunState,
    log: MetricsLog | NullLog,
    save: Callable[[], None],
    on_status: Callable[[NonFiniteStatus], None],
    clock: RunClock | None = None,
) -> None:
    """Run (or finish, after a resume) every init stage of the run's distiller.

    ``save`` writes ``last.pt`` (the stage's progress and optimiser are part of ``state.init``);
    ``on_status`` takes the non-finite state after a refused step (it raises to stop the run); ``clock``
    (stage ``i`` of its plan is init stage ``i``) gives the progress bar the run ETA."""
    stages = setup.distiller.init_stages()
    progress = state.init
    cfg = setup.cfg
    while progress.done < len(stages):
        index = progress.done
        stage = stages[index]
        optimizer = progress.optimizer = _stage_optimizer(setup, stage, progress)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        step = TrainStep(
            _stage_forward(stage),
            optimizer,
            precision=cfg.train.precision,
            check="step",
            on_nonfinite=cfg.train.on_nonfinite,
            max_skipped=cfg.train.max_skipped_batches,
            grad_sync=(lambda ps=params: all_reduce_gradients(ps)) if setup.dist.enabled else None,
        )
        step.load_skipped(state.skipped)
        loop = EpochLoop(
            step,
            on_status=on_status,
            progress=cfg.train.progress if setup.is_main else False,
            world_size=setup.dist.world_size,
            memory_format=setup.memory_format,
            checkpoint=save,
            checkpoint_every=cfg.train.checkpoint_every_steps,
            clock=clock,
        )
        iterator = _stage_iterator(setup, index)
        spe = min(len(iterator), setup.steps_per_epoch)
        while progress.epoch < stage.epochs:
            _stage_epoch(setup, progress, stage, index, iterator, loop, spe, log, state.global_step)
            save()
        progress.done += 1
        progress.epoch = progress.step = 0
        progress.optimizer_state = progress.optimizer = None
        save()


def _stage_forward(stage: InitStage):
    """The stage's loss as a TrainStep model: ``(images, labels, index, ctx) -> (None, terms)``."""

    takes_ctx = accepts_context(stage.loss_fn, 2)

    def forward(images, labels, index, ctx: StepContext):
        return None, stage.loss_fn(images, index, ctx) if takes_ctx else stage.loss_fn(images, index)

    return forward


def _stage_epoch(
    setup, progress, stage, index, iterator, loop: EpochLoop, spe: int, log, global_step: int
) -> None:
    _stage_modes(setup, stage)
    meter = Meter()

    def record(out, batch, n):
        values = {f"loss.{k}": v for k, v in out.terms.items()} | {"loss.total": out.total}
        meter.add(values, n)
        return values

    stats = loop.run(
        iterator.epoch(progress.epoch, start_step=progress.step),
        progress,
        steps=spe,
        desc=f"init {stage.name} {progress.epoch + 1}/{stage.epochs}",
        context=lambda s: StepContext(stage.name, progress.epoch, s, spe, stage.epochs),
        record=record,
        at=(index, progress.epoch),
    )
    record_ = {"stage": stage.name, "stage_index": index, "stage_epoch": progress.epoch}
    record_ |= {f"init.{k}": v for k, v in meter.reduced().means().items()}
    record_["init.images_per_s"] = stats.images * setup.dist.world_size / max(stats.seconds, 1e-9)
    log.write(record_, global_step)
    progress.epoch += 1
    progress.step = 0
