"""One epoch of training steps: the loop every stage runs (docs/architecture.md).

The main training (:mod:`.trainer`), the methods' init stages (:mod:`.init_stages`) and the linear probe's
classifier (:mod:`.linear_probe`) all run their epochs through :class:`EpochLoop`. For each batch it builds
the step's :class:`~mimkd.distillers.step_context.StepContext`, lets the stage set its learning rate, runs
one :class:`~mimkd.engine.step.TrainStep`, hands an applied step's result to the stage's ``record`` callback
(meters, counters), advances the cursor, draws the progress bar (lagged loss values and images per second,
never a device read) and writes a checkpoint every ``checkpoint_every`` steps. A step refused as non-finite
advances the cursor but is not recorded; the stage's ``on_status`` decides whether the run stops.

A stage's position lives in its own cursor (any object with a mutable ``step``: the run state of the main
stage, :class:`~mimkd.engine.init_stages.InitProgress`, :class:`Cursor`), so checkpoints hold it and a resumed
epoch starts from ``cursor.step``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from mimkd.distillers.step_context import StepContext

from .logging import LaggedScalars, progress_bar
from .step import NonFiniteStatus, StepResult, TrainStep

__all__ = ["Cursor", "EpochLoop", "EpochStats"]

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
    ) -> None:
        self.step = step
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
    ) -> EpochStats:
        """One epoch: ``batches`` from ``cursor.step`` on (the iterator starts there), at most ``steps``.

        ``context(step)`` gives the step's context, ``before_step(ctx)`` runs first (learning rate),
        ``inspect(ctx)`` returns the step's gradient probe or None, ``record(result, batch, n)`` takes an
        applied step and returns the ``loss.*`` values the bar shows.
        """
        bar = progress_bar(steps, desc, self.progress, initial=cursor.step)
        shown, stats, t0 = LaggedScalars(), EpochStats(), time.time()
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
                if out.applied is False:  # refused (check="step"): skipped, or the run stops here
                    self.on_status(self.step.status())
                    continue
                values = record(out, batch, images.shape[0])
                stats.images += images.shape[0]
                if not bar.disable and (bar.n % 10 == 0 or cursor.step == steps):
                    self._postfix(bar, shown, values, stats.images / max(time.time() - t0, 1e-9))
                bar.update(1)
                if self.checkpoint_every and cursor.step % self.checkpoint_every == 0 and cursor.step < steps:
                    self.on_status(self.step.status())
                    assert self.checkpoint is not None
                    self.checkpoint()
        finally:
            bar.close()
        stats.seconds = time.time() - t0
        return stats

    def _postfix(self, bar: Any, shown: LaggedScalars, values: dict[str, Any], rate: float) -> None:
        shown.push({k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("loss.")})
        latest = {k: f"{v:.3f}" for k, v in (shown.latest() or {}).items()}
        bar.set_postfix(latest | {"img/s": f"{rate * self.world_size:.0f}"}, refresh=False)


def _views(batch: Any) -> dict[str, torch.Tensor]:
    """A batch's extra views (``{}`` for a batch type without them, e.g. the linear probe's)."""
    return dict(getattr(batch, "views", None) or {})
