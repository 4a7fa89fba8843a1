"""One training step, exactly as :class:`~mimkd.engine.trainer.Trainer` runs it (``mimkd bench`` times it).

::

    step = TrainStep(distiller, optimizer, precision="fp32")     # or the DDP-wrapped distiller
    out = step(images, labels, index)                             # -> StepResult (detached tensors)

A step: forward under ``torch.autocast`` when ``precision="bf16"`` (the backward runs outside it, as
recommended), the terms summed in float32, a non-finite check, ``zero_grad``, backward, the optional gradient
all-reduce (``grad_sync``; DDP does its own inside the backward), ``optimizer.step()``. Nothing in it reads a
device value on the host except the non-finite check in ``check="step"`` mode:

* ``check="step"``: one boolean read per step. On a CPU it costs nothing (there is no device queue to wait
  for) and keeps the simplest semantics: a non-finite step skips its backward and its update. The default
  on a CPU.
* ``check="deferred"``: no read at all. The non-finite flag masks the update on the device (a fused
  optimiser's ``found_inf``, as ``GradScaler`` does), device counters record the skipped steps and the first
  bad step's terms, and the trainer reads them (:meth:`TrainStep.status`) only at checkpoint and log
  boundaries. ``on_nonfinite="stop"`` masks every update after the first bad step, so the weights stay at the
  last good state until the trainer stops the run at the next boundary. The default on CUDA.

Under ``torch.distributed`` the per-term flags are all-reduced (max) so that every rank takes the same
decision (an asynchronous collective on NCCL).

The teacher runs under ``torch.no_grad`` inside the distillers, not ``torch.inference_mode``: several methods
feed teacher features to layers that save their input for the backward (CRD/WCoRD's teacher embedding head,
MIMKD's critics), which inference tensors refuse, and on the development CPU inference mode measured no faster
(``results/engine_options_cpu.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

from mimkd.errors import ConfigError

__all__ = ["NonFiniteStatus", "StepResult", "TrainStep", "compile_distiller", "resolve_check"]

Forward = Callable[[Tensor, "Tensor | None", "Tensor | None"], tuple["Tensor | None", dict[str, Tensor]]]


@dataclass
class StepResult:
    """What one step returns; every tensor is detached and stays on the device.

    Attributes:
        logits: the student's logits (``None`` for an init stage).
        terms: each named (weighted) loss term.
        total: their sum (float32).
        nonfinite: per term (in ``terms`` order), whether it was non-finite on any rank (bool vector).
        applied: ``True``/``False`` when known on the host (``check="step"``); ``None`` when deferred.
        keep: in deferred mode, a device bool scalar that is False when the step's update was masked (for
            the meters); ``None`` otherwise.
        grads: what ``inspect`` returned (per-term gradient statistics), empty when no probe ran.
    """

    logits: Tensor | None
    terms: dict[str, Tensor]
    total: Tensor
    nonfinite: Tensor
    applied: bool | None
    keep: Tensor | None = None
    grads: dict[str, Tensor] = field(default_factory=dict)  # the ``inspect`` probe's values (logged steps)


@dataclass
class NonFiniteStatus:
    """The non-finite state read on the host: skipped steps, and whether (and where) the run must stop."""

    skipped: int = 0
    halted: bool = False
    position: Any = None  # what the caller passed as ``position`` for the first step that halted the run
    terms: list[str] = field(default_factory=list)  # the non-finite terms of that step
    values: list[float] = field(default_factory=list)  # their values on this rank


def resolve_check(check: str, device: torch.device) -> Literal["step", "deferred"]:
    """``auto`` -> ``deferred`` on CUDA, ``step`` elsewhere."""
    if check == "auto":
        return "deferred" if device.type == "cuda" else "step"
    if check not in ("step", "deferred"):
        raise ConfigError(f"train.nonfinite_check must be auto, step or deferred, got {check!r}")
    return check  # type: ignore[return-value]


def _supports_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        g.get("fused") for g in optimizer.param_groups
    )


def _init_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Create SGD's momentum buffers (zeros) before the first step.

    Fused SGD allocates them with ``empty_like`` on its first step and fills them in the kernel; when that
    first step is masked by ``found_inf`` they stay uninitialised and the next step reads garbage (observed
    with torch 2.13 on a CPU: a parameter jumped to 95). With zero buffers and dampening 0 the first real step
    computes ``buf = 0·m + g = g``, exactly what the first-step initialisation does.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if not group.get("momentum"):
            continue
        if group.get("dampening", 0.0):
            raise ConfigError("deferred non-finite checks need SGD without dampening")
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class TrainStep:
    """The trainer's training step (forward, loss sum, non-finite check, backward, update).

    Args:
        model: ``(images, labels, index) -> (logits, {term: loss})``: a :class:`~mimkd.distillers.base.
            Distiller`, the same wrapped in DistributedDataParallel, or any such callable.
        optimizer: the optimiser of the trainable parameters.
        precision: ``"fp32"`` or ``"bf16"`` (``torch.autocast`` on the images' device during the forward).
        check: ``"step"`` or ``"deferred"`` (module docstring); ``"deferred"`` needs a fused SGD/AdamW
            (``build_optimizer(..., fused=True)``).
        on_nonfinite: ``"stop"`` or ``"skip"`` (``train.on_nonfinite``).
        max_skipped: with ``"skip"``, the run stops once more than this many steps were skipped.
        grad_sync: called after the backward (e.g. :func:`mimkd.engine.distributed.all_reduce_gradients`
            for parts trained outside DDP).

    Call it as ``step(images, labels, index, position=None, inspect=None, context=None)``; ``position``
    (the step's :class:`~mimkd.distillers.step_context.StepContext` in the trainer) is reported back by
    :meth:`status` for the first step that stopped the run; ``context``, when given, is passed to the model
    as its fourth argument (``model(images, labels, index, context)``), and ``views`` (a batch's extra
    views, when it has any) as the keyword ``views=``.
    ``inspect(logits, labels, terms)``, when given, runs after the forward and before the backward (on the
    graph, which it must retain) and its dict is returned in :attr:`StepResult.grads`
    (:class:`~mimkd.engine.term_grads.TermGradients`); it is skipped on a step refused as non-finite.
    """

    def __init__(
        self,
        model: Forward | torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        precision: str = "fp32",
        check: str = "step",
        on_nonfinite: str = "stop",
        max_skipped: int = 100,
        grad_sync: Callable[[], None] | None = None,
    ) -> None:
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be fp32 or bf16, got {precision!r}")
        if check not in ("step", "deferred"):
            raise ConfigError(f"TrainStep: check must be 'step' or 'deferred', got {check!r}")
        if on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.on_nonfinite must be stop or skip, got {on_nonfinite!r}")
        if check == "deferred":
            if not _supports_found_inf(optimizer):
                raise ConfigError(
                    "deferred non-finite checks mask the update on the device and need a fused optimiser "
                    "(build_optimizer(..., fused=True)); use train.nonfinite_check=step"
                )
            _init_momentum(optimizer)
        self.model = model
        self.optimizer = optimizer
        self.precision = precision
        self.check = check
        self.on_nonfinite = on_nonfinite
        self.max_skipped = int(max_skipped)
        self.grad_sync = grad_sync
        self._status = NonFiniteStatus()  # host state (check="step"; the last read in deferred mode)
        self._base_skipped = 0  # skipped steps restored by a resume (deferred mode)
        self._dev: dict[str, Tensor] | None = None  # device state (check="deferred")
        self._positions: list[Any] = []  # host positions of the deferred steps since the last status()
        self._names: list[str] = []

    # ------------------------------------------------------------------------------------------------
    def __call__(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        index: Tensor | None = None,
        position: Any = None,
        inspect: Callable[..., dict[str, Tensor]] | None = None,
        context: Any = None,
        views: Any = None,
    ) -> StepResult:
        """Run one step on a batch; see the class docstring."""
        try:
            return self._run(images, labels, index, position, inspect, context, views)
        except Exception as e:  # a torch.compile failure surfaces at the first step: one clear line
            where = type(e).__module__
            if where.startswith(("torch._dynamo", "torch._inductor")):
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                raise ConfigError(
                    f"train.compile: torch.compile failed ({type(e).__name__}: {first}); run without "
                    "--set train.compile=true"
                ) from None
            raise

    def _run(
        self,
        images: Tensor,
        labels: Tensor | None,
        index: Tensor | None,
        position: Any,
        inspect: Any,
        context: Any,
        views: Any = None,
    ) -> StepResult:
        args = (images, labels, index) if context is None else (images, labels, index, context)
        kwargs = {"views": views} if views else {}
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            logits, terms = self.model(*args, **kwargs)
        if not terms:
            raise ConfigError("the method returned no loss terms: nothing to optimise")
        total = sum(t.float() for t in terms.values())
        values = torch.stack([t.detach().float().reshape(()) for t in terms.values()])
        bad = ~torch.isfinite(values)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flags = bad.to(torch.uint8)
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            bad = flags.bool()
        self._names = list(terms)
        detached = {k: v.detach() for k, v in terms.items()}
        out_logits = logits.detach() if logits is not None else None
        if self.check == "step":
            if bool(bad.any()):
                self._refuse(bad, values, position)
                return StepResult(out_logits, detached, total.detach(), bad, applied=False)
            grads = inspect(logits, labels, terms) if inspect is not None else {}
            self._update(total)
            return StepResult(out_logits, detached, total.detach(), bad, applied=True, grads=grads)
        keep = self._deferred_flags(bad, values, position)
        grads = inspect(logits, labels, terms) if inspect is not None else {}
        self._update(total)
        return StepResult(out_logits, detached, total.detach(), bad, applied=None, keep=keep, grads=grads)

    def _update(self, total: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.grad_sync is not None:
            self.grad_sync()
        self.optimizer.step()

    # -- check="step" --------------------------------------------------------------------------------
    def _refuse(self, bad: Tensor, values: Tensor, position: Any) -> None:
        s = self._status
        if self.on_nonfinite == "skip" and s.skipped < self.max_skipped:
            s.skipped += 1
            self.optimizer.zero_grad(set_to_none=True)
            return
        flags = bad.tolist()
        s.halted = True
        s.position = position
        s.terms = [k for k, f in zip(self._names, flags) if f] or ["total"]
        s.values = [float(v) for v, f in zip(values.tolist(), flags) if f] or [float("nan")]

    # -- check="deferred" ----------------------------------------------------------------------------
    def _deferred_flags(self, bad: Tensor, values: Tensor, position: Any) -> Tensor:
        """Update the device counters and set the optimiser's ``found_inf``; return the 'keep' flag."""
        dev = self._dev
        if dev is None or dev["first_terms"].numel() != bad.numel():
            zero = torch.zeros((), dtype=torch.int64, device=values.device)
            dev = self._dev = {
                "count": zero.clone(),  # steps run since the positions list was last cleared
                "skipped": zero.clone(),  # skipped since this state was created (plus _base_skipped)
                "halted": torch.zeros((), dtype=torch.bool, device=values.device),
                "first": torch.full((), -1, dtype=torch.int64, device=values.device),  # count of halting step
                "first_terms": torch.zeros_like(bad),
                "first_values": torch.zeros_like(values),
            }
            self._positions.clear()
        any_bad = bad.any()
        was_halted = dev["halted"].clone()
        if self.on_nonfinite == "skip":
            skip_now = any_bad & ~was_halted & (dev["skipped"] < self.max_skipped - self._base_skipped)
            dev["skipped"] += skip_now.long()
            halted = was_halted | (any_bad & ~skip_now)
        else:
            halted = was_halted | any_bad
        newly = halted & ~was_halted
        dev["first"] = torch.where(newly, dev["count"], dev["first"])
        dev["first_terms"] = torch.where(newly, bad, dev["first_terms"])
        dev["first_values"] = torch.where(newly, values, dev["first_values"])
        dev["halted"] = halted
        dev["count"] += 1
        self._positions.append(position)
        masked = any_bad | halted
        self.optimizer.found_inf = masked.float()  # type: ignore[attr-defined]
        return ~masked

    # ------------------------------------------------------------------------------------------------
    def status(self) -> NonFiniteStatus:
        """The non-finite state on the host. In deferred mode this reads the device (one synchronisation):
        call it at checkpoint and log boundaries, not every step."""
        if self.check == "step" or self._dev is None:
            return self._status
        dev = self._dev
        skipped, halted, first = torch.stack([dev["skipped"], dev["halted"].long(), dev["first"]]).tolist()
        s = self._status
        s.skipped = self._base_skipped + int(skipped)
        if halted and not s.halted:
            flags = dev["first_terms"].tolist()
            vals = dev["first_values"].tolist()
            s.halted = True
            s.position = self._positions[first] if 0 <= first < len(self._positions) else None
            s.terms = [k for k, f in zip(self._names, flags) if f] or ["total"]
            s.values = [v for v, f in zip(vals, flags) if f] or [float("nan")]
        if not halted:  # the counters index into the positions list: restart both
            self._positions.clear()
            dev["count"].zero_()
        return s

    def load_skipped(self, skipped: int) -> None:
        """Restore the count of skipped steps (resume)."""
        self._status.skipped = self._base_skipped = int(skipped)
        if self._dev is not None:
            self._dev["skipped"].zero_()


def compile_distiller(distiller: torch.nn.Module, **options: Any) -> torch.nn.Module:
    """``torch.compile`` (in place, :meth:`torch.nn.Module.compile`) every direct part of ``distiller`` that
    has parameters: the student, the teacher, the peers of DML/DCM and the method's own modules (critics,
    heads, connectors; their ``forward``).

    Networks that carry a :class:`~mimkd.features.FeatureTap` (every feature method's student and teacher)
    compile too: the tap's hooks record only inside its scoped capture and skip the version counters while
    compiling, so dynamo keeps one graph with recording on (the training step) and one with it off
    (evaluation). The distiller's own ``forward`` (loss terms, memory banks,
    negative sampling with its data-dependent loops) stays eager. Compilation happens at the first step; a
    failure is reported by :class:`TrainStep` as one line naming the compiler error. Returns ``distiller``.
    """
    for _, child in distiller.named_children():
        if any(True for _ in child.parameters()):
            child.compile(**options)
    return distiller
