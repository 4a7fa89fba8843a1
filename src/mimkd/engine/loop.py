"""One epoch of training steps: the loop every stage runs (docs/architecture.md).

The main training (:mod:`.trainer`), the methods' init stages (:mod:`.init_stages`) and the linear probe's
classifier (:mod:`.linear_probe`) all run their epochs through :class:`EpochLoop`. For each batch it builds
the step's :class:`~mimkd.distillers.step_context.StepContext`, lets the stage set its learning rate, runs
one :class:`~mimkd.engine.step.TrainStep`, hands an applied step's result to the stage's ``record`` callback
(meters, counters), advances the cursor, draws the progress bar (lagged loss values and images per second,
never a device read) and writes a checkpoint every ``checkpoint_every`` steps. A step refused as non-finite
advances the cursor but is not recorded; the stage's ``on_status`` decides whether the run stops.

The bar's postfix also shows the whole run's ETA (``run ETA 12:34``, every stage and epoch still to come) when
the loop is given a :class:`RunClock`: the steps left (:func:`steps_left` over the run's :class:`StagePlan`
list) times the seconds per step measured over the steps this process ran so far (evaluation and checkpoint
time between epochs included, since it is wall time). After a resume it counts from the resumed position
(docs/trackers.md, "The progress bar's run ETA").

A stage's position lives in its own cursor (any object with a mutable ``step``: the run state of the main
stage, :class:`~mimkd.engine.init_stages.InitProgress`, :class:`Cursor`), so checkpoints hold it and a resumed
epoch starts from ``cursor.step``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mimkd.distillers.step_context import StepContext

from .logging import LaggedScalars, progress_bar
from .step import NonFiniteStatus, StepResult, TrainStep

__all__ = [
    "Cursor",
    "EpochLoop",
    "EpochStats",
    "RunClock",
    "StagePlan",
    "format_eta",
    "run_eta",
    "steps_left",
]

Record = Callable[[StepResult, Any, int], dict[str, Any]]


class HasStep(Protocol):
    step: int


@dataclass
class Cursor:
    """A stage position that lives nowhere else (the linear probe's): steps done in the current epoch."""

    step: int = 0


@dataclass
class EpochStats:
    """What one epoch of the loop measured on this rank."""

    images: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class StagePlan:
    """One stage of a run as the ETA counts it: its epochs and its steps per epoch."""

    name: str
    epochs: int
    steps_per_epoch: int


def steps_left(plan: Sequence[StagePlan], stage: int, epoch: int, step: int) -> int:
    """Steps still to run from ``step`` of ``epoch`` of ``plan[stage]`` to the end of the last stage (the run
    ETA, docs/trackers.md)."""
    if stage >= len(plan):
        return 0
    here = plan[stage]
    left = max(here.steps_per_epoch - step, 0) + max(here.epochs - epoch - 1, 0) * here.steps_per_epoch
    return left + sum(p.epochs * p.steps_per_epoch for p in plan[stage + 1 :])


def run_eta(seconds: float, steps_done: int, steps_to_go: int) -> float | None:
    """Seconds to the end: ``steps_to_go`` at the rate of ``steps_done`` steps in ``seconds`` (None before
    the first step)."""
    if steps_done <= 0:
        return None
    return seconds / steps_done * steps_to_go


def format_eta(seconds: float | None) -> str:
    """``75`` -> ``'01:15'``, ``3725`` -> ``'1:02:05'``; ``'?'`` when unknown."""
    if seconds is None:
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class RunClock:
    """The steps this process ran and when it started: the measured rate of the run ETA (module docstring)."""

    def __init__(self, plan: Sequence[StagePlan]) -> None:
        self.plan = list(plan)
        self.steps = 0
        self.started: float | None = None

    def start(self) -> None:
        if self.started is None:
            self.started = time.time()

    def tick(self) -> None:
        self.steps += 1

    def eta(self, stage: int, epoch: int, step: int) -> float | None:
        """Seconds left in the run from (``stage``, ``epoch``, ``step``), at the rate measured so far."""
        if self.started is None:
            return None
        left = steps_left(self.plan, stage, epoch, step)
        return run_eta(time.time() - self.started, self.steps, left)


class EpochLoop:
    """Runs epochs of :class:`TrainStep` calls (module docstring).

    Args:
        step: the stage's training step.
        on_status: called with the step's :class:`NonFiniteStatus` after a refused step and before every
            checkpoint; it raises to stop the run.
        progress: draw a progress bar.
        world_size: processes whose images the bar's rate counts (each rank runs the same loop).
        memory_format: the images' memory format (``train.channels_last``).
        checkpoint: writes the resume state; called every ``checkpoint_every`` steps inside an epoch.
        checkpoint_every: 0 for never.
        clock: the run's clock; with it the bar shows the run ETA of the position ``run(at=...)`` names.
    """

    def __init__(
        self,
        step: TrainStep,
        *,
        on_status: Callable[[NonFiniteStatus], None],
        progress: bool = True,
        world_size: int = 1,
        memory_format: torch.memory_format = torch.contiguous_format,
        checkpoint: Callable[[], None] | None = None,
        checkpoint_every: int = 0,
        clock: RunClock | None = None,
    ) -> None:
        self.step = step
        self.clock = clock
        self.on_status = on_status
        self.progress = progress
        self.world_size = world_size
        self.memory_format = memory_format
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every if checkpoint is not None else 0

    def run(
        self,
        batches: Iterable[Any],
        cursor: HasStep,
        *,
        steps: int,
        desc: str,
        context: Callable[[int], StepContext],
        record: Record,
        before_step: Callable[[StepContext], None] | None = None,
        inspect: Callable[[StepContext], Any] | None = None,
        at: tuple[int, int] | None = None,
    ) -> EpochStats:
        """One epoch: ``batches`` from ``cursor.step`` on (the iterator starts there), at most ``steps``.

        ``context(step)`` gives the step's context, ``before_step(ctx)`` runs first (learning rate),
        ``inspect(ctx)`` returns the step's gradient probe or None, ``record(result, batch, n)`` takes an
        applied step and returns the ``loss.*`` values the bar shows. ``at``: (stage index, epoch) of this
        epoch in the clock's plan, for the run ETA.
        """
        bar = progress_bar(steps, desc, self.progress, initial=cursor.step)
        shown, stats, t0 = LaggedScalars(), EpochStats(), time.time()
        clock = self.clock if at is not None else None
        if clock is not None:
            clock.start()
        try:
            for batch in batches:
                if cursor.step >= steps:
                    break
                ctx = context(cursor.step)
                if before_step is not None:
                    before_step(ctx)
                images = batch.images.contiguous(memory_format=self.memory_format)
                views = {k: v.contiguous(memory_format=self.memory_format) for k, v in _views(batch).items()}
                probe = inspect(ctx) if inspect is not None else None
                out = self.step(
                    images, batch.labels, batch.index, position=ctx, inspect=probe, context=ctx, views=views
                )
                cursor.step += 1
                if clock is not None:
                    clock.tick()
                if out.applied is False:  # refused (check="step"): skipped, or the run stops here
                    self.on_status(self.step.status())
                    continue
                values = record(out, batch, images.shape[0])
                stats.images += images.shape[0]
                if not bar.disable and (bar.n % 10 == 0 or cursor.step == steps):
                    eta = format_eta(clock.eta(*at, cursor.step)) if clock is not None and at else None
                    self._postfix(bar, shown, values, stats.images / max(time.time() - t0, 1e-9), eta)
                bar.update(1)
                if self.checkpoint_every and cursor.step % self.checkpoint_every == 0 and cursor.step < steps:
                    self.on_status(self.step.status())
                    assert self.checkpoint is not None
                    self.checkpoint()
        finally:
            bar.close()
        stats.seconds = time.time() - t0
        return stats

    def _postfix(
        self, bar: Any, shown: LaggedScalars, values: dict[str, Any], rate: float, eta: str | None = None
    ) -> None:
        shown.push({k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("loss.")})
        latest = {k: f"{v:.3f}" for k, v in (shown.latest() or {}).items()}
        fields = [f"{k}={v}" for k, v in (latest | {"img/s": f"{rate * self.world_size:.0f}"}).items()]
        if eta is not None:
            fields.append(f"run ETA {eta}")
        bar.set_postfix_str(", ".join(fields), refresh=False)


def _views(batch: Any) -> dict[str, torch.Tensor]:
    """A batch's extra views (``{}`` for a batch type without them, e.g. the linear probe's)."""
    return dict(getattr(batch, "views", None) or {})
