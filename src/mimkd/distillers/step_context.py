"""Where training is, as every method's ``compute`` sees it (docs/architecture.md).

The trainer builds one :class:`StepContext` per step and passes it through the distiller's ``forward`` to
``compute`` (and to an init stage's loss), so a warm-up, a ramped weight or a temperature schedule is the
method's own business: the trainer never learns that a method has one.

Positions count what is *done*: at the first step of a run ``epoch == step == 0`` and ``progress == 0``;
during the last step of the last epoch ``progress == (total_steps - 1) / total_steps``. ``epoch_position``
(``epoch + step / steps_per_epoch``) is the fractional epoch a per-epoch schedule reads (DKD's warm-up:
``min(epoch_position / 20, 1)``, or ``min((epoch + 1) / 20, 1)`` per whole epoch as its reference code
does).

Called outside a trainer (a user's own loop, a test) a distiller gets :meth:`StepContext.standalone`: every
schedule at its end value (``progress == 1``), so a method behaves as it does once training is past any
warm-up. A context is plain Python numbers: reading it never touches a device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["StepContext", "MAIN", "STANDALONE", "accepts_context"]

MAIN = "main"  #: the main training stage's name
STANDALONE = "standalone"  #: a call outside the trainer (schedules at their end)


def accepts_context(fn: Callable[..., Any], positional: int) -> bool:
    """Whether ``fn`` takes a context after its first ``positional`` arguments (a method written before
    StepContext existed, ``compute(images, labels, index)``, does not and is called without it)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return True
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    return len([p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) > positional


@dataclass(frozen=True)
class StepContext:
    """The position of one training step.

    Attributes:
        stage: ``"main"``, an init stage's name (``"hint"``, ``"critic_warmup"``, ...), ``"probe"`` (a linear
            probe's head) or ``"standalone"``.
        epoch: epochs completed in this stage (0-based index of the running epoch).
        step: steps completed in this epoch (0-based index of the running step).
        steps_per_epoch: steps in one epoch of this stage.
        epochs: epochs of this stage.
    """

    stage: str = STANDALONE
    epoch: int = 1
    step: int = 0
    steps_per_epoch: int = 1
    epochs: int = 1

    def __post_init__(self) -> None:
        if self.steps_per_epoch < 1 or self.epochs < 1:
            raise ValueError(
                f"StepContext: steps_per_epoch ({self.steps_per_epoch}) and epochs ({self.epochs}) must "
                "be ≥ 1"
            )
        if self.epoch < 0 or self.step < 0:
            raise ValueError(f"StepContext: epoch ({self.epoch}) and step ({self.step}) must be ≥ 0")

    @classmethod
    def standalone(cls) -> StepContext:
        """The context of a call outside the trainer: every schedule finished (``progress == 1``)."""
        return cls()

    @property
    def global_step(self) -> int:
        """Steps completed in this stage."""
        return self.epoch * self.steps_per_epoch + self.step

    @property
    def total_steps(self) -> int:
        """Steps of the whole stage."""
        return self.epochs * self.steps_per_epoch

    @property
    def progress(self) -> float:
        """Fraction of the stage done, in [0, 1]."""
        return min(max(self.global_step / self.total_steps, 0.0), 1.0)

    @property
    def epoch_position(self) -> float:
        """The fractional epoch: ``epoch + step / steps_per_epoch``."""
        return self.epoch + self.step / self.steps_per_epoch

    def warmup(self, epochs: float) -> float:
        """A linear warm-up factor in [0, 1] over the first ``epochs`` epochs, counted per whole epoch as
        the reference implementations do (``min((epoch + 1) / epochs, 1)``); 1 when ``epochs <= 0`` and in a
        standalone call."""
        if epochs <= 0 or self.stage == STANDALONE:
            return 1.0
        return min((self.epoch + 1) / epochs, 1.0)
