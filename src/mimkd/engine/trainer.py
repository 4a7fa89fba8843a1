"""The training loop. It never names a method: it sums whatever terms the distiller returns.

One loop serves ``mimkd train`` (the ``vanilla`` distiller) and ``mimkd distill``. Per run directory it writes
``config.yaml``, ``metrics.jsonl`` (one record per epoch; mirrored to the ``train.loggers`` trackers,
docs/trackers.md), ``last.pt`` (complete resume state, written atomically every ``checkpoint_every_steps``
steps and at the end of every epoch), ``best.pt`` (the student at its best test epoch) and ``summary.json``
(last AND best epoch accuracy).

Exact resume: batches are a pure function of (seed, epoch, step) (see :class:`mimkd.data.BatchIterator`), the
learning rate a pure function of (epoch, step), and the checkpoint holds weights, method state (critics,
memory banks), optimiser, every RNG state and the partial epoch meters. A seeded CPU run interrupted at any
step and resumed ends with weights bit-identical to an uninterrupted run.

Methods with several networks (DML, DCM) list them in ``distiller.networks()``: each is evaluated every
evaluation epoch (``test.<name>.top1`` in the metrics), each gets its own best checkpoint (``best.pt`` for the
first, ``best_<name>.pt`` for the others) and the summary reports every network. A label-free method
(``Capabilities(uses_labels=False, evaluated=False)``, KDEP pre-training) trains on batches without labels
and is not evaluated: its classifier is untrained; ``mimkd finetune`` measures what it learnt. A method's
``offline_pass`` (KDEP's SVD) runs once before training, with a progress bar, and its result is part of
``last.pt``.

Structure: the run's fixed facts are a :class:`~mimkd.engine.run_state.RunSetup`, its position and records a
:class:`~mimkd.engine.run_state.RunState` (what ``last.pt`` and ``summary.json`` are built from); every
epoch, of the main stage and of the init stages, runs through :class:`~mimkd.engine.loop.EpochLoop`, and every
step gives the method a :class:`~mimkd.distillers.step_context.StepContext`.

Speed (``train.*``): the step is :class:`~mimkd.engine.step.TrainStep` (``precision`` bf16 autocast,
``nonfinite_check``), ``compile`` compiles the networks and the method's modules, ``channels_last`` keeps
NHWC tensors, ``data_on_device`` keeps the uint8 dataset (and the augmentation) on the GPU. The step performs
no host-device synchronisation on CUDA (deferred non-finite check); losses reach the meters as device tensors,
read once per epoch, and the progress bar shows values copied asynchronously (a few steps old).

Distributed (``torchrun``, :mod:`mimkd.engine.distributed`): batch ``optim.batch_size`` per process, each
rank its slice of the same global batch; the distiller wrapped in DDP; only rank 0 writes; evaluation is
sharded over the ranks (each evaluates its contiguous share of the test set with rank 0's BatchNorm
statistics, and the counts are summed), so every rank holds the same record and the same best epoch.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from mimkd.checkpoint import FORMAT, VERSION, atomic_save, capture_rng, load_checkpoint, restore_rng
from mimkd.config import RunConfig
from mimkd.data import BatchAugment, BatchIterator, ImageDataset, eval_batches
from mimkd.data.loader import storage_device
from mimkd.data.views import build_views
from mimkd.distillers.base import Distiller
from mimkd.distillers.step_context import StepContext
from mimkd.errors import CheckpointError, ConfigError, MimkdWarning, NonFiniteLossError
from mimkd.evaluation.accuracy import topk_correct

from . import distributed, trackers
from .distributed import DistInfo, evaluate_sharded
from .identity import identity_mismatch, teacher_identity
from .init_stages import run_init_stages
from .logging import MetricsLog, NullLog, progress_bar, write_json
from .loop import EpochLoop, RunClock, StagePlan
from .recipe import build_optimizer, lr_at, param_groups, set_lr
from .run_state import RunSetup, RunState, StudentInfo
from .step import NonFiniteStatus, TrainStep, compile_distiller, resolve_check
from .summary import build_summary
from .term_grads import TermGradients

__all__ = ["Trainer", "StudentInfo"]


class Trainer:
    """Runs a distiller over a dataset with checkpoints, metrics and exact resume."""

    def __init__(
        self,
        cfg: RunConfig,
        distiller: Distiller,
        train_set: ImageDataset,
        test_set: ImageDataset,
        run_dir: Path,
        device: torch.device,
        student_info: StudentInfo,
        augment=None,
        extra_summary: dict[str, Any] | None = None,
        dist_info: DistInfo | None = None,
    ) -> None:
        t, o = cfg.train, cfg.optim
        trackers.require(t.loggers)  # a missing mlflow / wandb: refused before any work (docs/trackers.md)
        dist = dist_info if dist_info is not None else distributed.current()
        fmt = torch.channels_last if t.channels_last else torch.contiguous_format
        self.distiller = distiller.to(device=device, memory_format=fmt)
        self.run_dir = Path(run_dir)
        self.extra_summary = dict(extra_summary or {})
        storage = storage_device(t.data_on_device, train_set, device)
        if len(train_set) < o.batch_size * dist.world_size:
            raise ConfigError(
                f"optim.batch_size={o.batch_size} × {dist.world_size} process(es) is larger than the "
                f"training set ({len(train_set)} images)"
            )
        self.iterator = BatchIterator(
            train_set, o.batch_size, shuffle=True, drop_last=True, seed=cfg.seed, device=device,
            augment=augment, with_labels=distiller.uses_labels, rank=dist.rank, world_size=dist.world_size,
            storage_device=storage, views=_method_views(distiller, augment, train_set),
        )  # fmt: skip
        self.test_set = test_set.to(device) if storage == device else test_set
        spe = len(self.iterator)
        if t.max_steps_per_epoch:
            spe = min(spe, t.max_steps_per_epoch)
        check = resolve_check(t.nonfinite_check, device)
        self.setup = RunSetup(
            cfg, self.distiller, train_set, augment, device, storage, dist, fmt, spe, check,
            float(dist.world_size) if o.scale_lr else 1.0, student_info,
        )  # fmt: skip
        self.optimizer = build_optimizer(
            o,
            param_groups(distiller.trainable_named_parameters(), distiller.lr_scales()),
            fused=check == "deferred",
        )
        if t.compile:
            compile_distiller(self.distiller)
        self.model = distributed.wrap(self.distiller, device)  # DDP under torchrun, else the distiller
        self.train_step = TrainStep(
            self.model,
            self.optimizer,
            precision=t.precision,
            check=check,
            on_nonfinite=t.on_nonfinite,
            max_skipped=t.max_skipped_batches,
        )
        self.state = RunState()
        self.clock: RunClock | None = None  # the run ETA of the progress bar (set by fit)
        self.term_grads = self._term_grads()
        self.teacher_identity = self._teacher_identity()

    # the fixed facts, by their usual names
    cfg = property(lambda self: self.setup.cfg)
    device = property(lambda self: self.setup.device)
    memory_format = property(lambda self: self.setup.memory_format)
    train_set = property(lambda self: self.setup.train_set)
    steps_per_epoch = property(lambda self: self.setup.steps_per_epoch)
    is_main = property(lambda self: self.setup.is_main)
    dist = property(lambda self: self.setup.dist)

    def _term_grads(self) -> TermGradients | None:
        if not self.cfg.train.log_term_grads:
            return None
        if self.dist.world_size > 1:
            raise ConfigError(
                "train.log_term_grads runs extra backward passes outside DDP's gradient synchronisation: "
                "use it in a single-process run (drop --set train.log_term_grads)"
            )
        return TermGradients(self.distiller.student)

    def _teacher_identity(self) -> dict[str, Any] | None:
        """What the run distils from (recorded in every checkpoint; a resume must find the same)."""
        ident = self.extra_summary.get("teacher_identity")
        if ident is None and self.distiller.teacher is not None:  # a teacher built in memory (Python API)
            ident = teacher_identity(self.distiller.teacher, self.extra_summary.get("teacher"))
            self.extra_summary["teacher_identity"] = ident
        return ident

    def _schedule_warnings(self) -> None:
        """The method's warnings about this schedule (e.g. a memory bank's stale positives), one line each."""
        images = (
            self.cfg.optim.epochs * self.steps_per_epoch * self.cfg.optim.batch_size * self.dist.world_size
        )
        for message in self.distiller.schedule_warnings(images / max(len(self.train_set), 1)):
            warnings.warn(message, MimkdWarning, stacklevel=2)

    # ------------------------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Fail before any training if the run directory is unwritable or the disk cannot hold checkpoints."""
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.run_dir.glob(".*.pt.*.tmp"):  # a write cut short by a crash (atomic_save)
                stale.unlink(missing_ok=True)
            probe = self.run_dir / ".write_probe"
            probe.write_bytes(b"0" * 1024)
            probe.unlink()
        except OSError as e:
            raise ConfigError(
                f"run directory {str(self.run_dir)!r} is not writable ({e.strerror or e}); choose another "
                "--out directory or fix its permissions"
            ) from None
        need = 3 * sum(t.numel() * t.element_size() for t in self._state_tensors()) + (16 << 20)
        free = shutil.disk_usage(self.run_dir).free
        if free < need:
            raise ConfigError(
                f"not enough free disk space in {str(self.run_dir)!r}: {free / 2**20:.1f} MiB free, about "
                f"{need / 2**20:.1f} MiB needed for checkpoints; free some space or choose another --out"
            )

    def _state_tensors(self):
        yield from self.distiller.student.state_dict().values()
        yield from self.distiller.method_state_dict().values()
        for group in self.optimizer.param_groups:  # momentum buffers: one per parameter
            yield from group["params"]

    # ------------------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        """Everything ``last.pt`` holds (collective in a distributed run: the meters are summed)."""
        info, st = self.setup.student_info, self.state
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": self.distiller.student.state_dict(),
            "arch": info.arch,
            "num_classes": info.num_classes,
            "in_channels": info.in_channels,
            "method": self.distiller.name,
            "method_state": self.distiller.method_state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": capture_rng(self.device),
            **st.position(),
            "world_size": self.dist.world_size,
            "meter": st.meter.reduced().state_dict(),  # every rank's images (collective)
            "grad_meter": st.grad_meter.state_dict(),
            "wall_time": st.wall_before + (time.time() - self._t0),
            "config": self.cfg.model_dump(mode="json"),
            "input": self.setup.input_spec(),
            "teacher_identity": self.teacher_identity,
        }

    def save(self, name: str = "last.pt") -> None:
        """Write the resume state (rank 0 writes; every rank must call it: the meters are summed)."""
        state = self.checkpoint_state()
        if self.is_main:
            atomic_save(state, self.run_dir / name)

    def load(self, path: Path) -> None:
        ck = load_checkpoint(path, map_location="cpu")
        if ck.get("format") != FORMAT:
            raise CheckpointError(f"{str(path)!r} is not a mimkd run checkpoint; cannot resume from it")
        world = int(ck.get("world_size", 1))
        if world != self.dist.world_size:
            raise CheckpointError(
                f"{str(path)!r} was written by a run of {world} process(es); resume it with the same number "
                f"(this run has {self.dist.world_size}): the global batch and the step positions depend on it"
            )
        changed = identity_mismatch(ck.get("teacher_identity"), self.teacher_identity)
        if changed:
            raise CheckpointError(
                f"cannot resume {str(self.run_dir)!r}: {changed}; put the original teacher back, or start "
                "over with --overwrite"
            )
        self.distiller.student.load_state_dict(ck["model"])
        self.distiller.load_method_state_dict(ck["method_state"])
        self.optimizer.load_state_dict(ck["optimizer"])
        restore_rng(ck["rng"], self.device)
        st = self.state
        st.load_position(ck, len(self.distiller.init_stages()))
        if self.is_main:  # the saved meter holds every rank's images: load it once
            st.meter.load_state_dict(ck["meter"], self.device)
        if "grad_meter" in ck:
            st.grad_meter.load_state_dict(ck["grad_meter"], self.device)
        self.train_step.load_skipped(st.skipped)

    # ------------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to the last epoch (continuing from ``last.pt`` when ``resume``); return the summary."""
        self._t0 = time.time()
        if self.is_main:
            self.preflight()
            self._schedule_warnings()
        distributed.barrier()
        last = self.run_dir / "last.pt"
        if resume and last.exists():
            self.load(last)
        st = self.state
        log = self._open_log(resume)
        n_init = len(self.distiller.init_stages())
        p = st.init
        log.truncate_from_epoch(st.epoch, (p.done, p.epoch) if p.done < n_init else None)
        self.clock = RunClock(self._plan())
        ok = False
        try:
            if not self.distiller.offline_ready():
                self._offline_pass()
                self.save()
            self.run_init_stages(log)
            self.train_step.load_skipped(st.skipped)
            loop = self._main_loop()
            while st.epoch < self.cfg.optim.epochs:
                self._train_epoch(loop, log)
            summary = self.finish(log)
            log.store(self._artefacts())
            ok = True
        finally:
            log.close(ok)
        return summary

    def _open_log(self, resume: bool) -> MetricsLog | NullLog:
        """metrics.jsonl and the ``train.loggers`` trackers on rank 0; nothing on the other ranks."""
        if not self.is_main:
            return NullLog()
        opened = trackers.open_trackers(
            self.cfg.train.loggers,
            self.run_dir,
            self.cfg.model_dump(mode="json"),
            is_main=self.is_main,
            resume=resume,
            purge_step=self.state.global_step if resume else None,
        )
        return MetricsLog(self.run_dir, opened)

    def _plan(self) -> list[StagePlan]:
        """The run's stages for the ETA: the init stages, then the main training (the same steps per epoch:
        a stage iterates the same training set at the same batch size)."""
        spe = self.steps_per_epoch
        stages = [StagePlan(s.name, s.epochs, spe) for s in self.distiller.init_stages()]
        return [*stages, StagePlan("main", self.cfg.optim.epochs, spe)]

    def _artefacts(self) -> list[Path]:
        """What the trackers keep at the end: summary.json, and best*.pt with ``train.log_checkpoints``."""
        files = [self.run_dir / "summary.json"]
        if self.cfg.train.log_checkpoints:
            files += sorted(self.run_dir.glob("best*.pt"))
        return [f for f in files if f.is_file()]

    def run_init_stages(self, log: MetricsLog | NullLog) -> None:
        """Run (or finish, after a resume) the method's init stages."""
        run_init_stages(self.setup, self.state, log, self.save, self._after_refusal, self.clock)

    def _offline_pass(self) -> None:
        """The method's pass over the training images (normalised, unaugmented, no labels).

        In a distributed run rank 0 makes the pass and sends its result (the method state) to the others."""
        if self.is_main:
            bs = self.cfg.data.test_batch_size
            total = -(-len(self.train_set) // bs)
            batches = eval_batches(self.train_set, bs, self.device, with_labels=False)
            images = (b.images.contiguous(memory_format=self.memory_format) for b in batches)
            bar = progress_bar(total, f"{self.distiller.name}: offline pass", self.cfg.train.progress)
            try:
                self.distiller.offline_pass(_counted(images, bar), total, self.run_dir)
            finally:
                bar.close()
        if self.dist.enabled:
            state = (
                {k: v.cpu() for k, v in self.distiller.method_state_dict().items()} if self.is_main else None
            )
            state = distributed.broadcast_object(state)
            if not self.is_main:
                self.distiller.load_method_state_dict(state)

    def _main_loop(self) -> EpochLoop:
        return EpochLoop(
            self.train_step,
            on_status=self._after_refusal,
            progress=self.cfg.train.progress if self.is_main else False,
            world_size=self.dist.world_size,
            memory_format=self.memory_format,
            checkpoint=self.save,
            checkpoint_every=self.cfg.train.checkpoint_every_steps,
            clock=self.clock,
        )

    def _train_epoch(self, loop: EpochLoop, log: MetricsLog | NullLog) -> None:
        cfg, d, st, setup = self.cfg, self.distiller, self.state, self.setup
        d.train()
        every = cfg.train.log_term_grads

        def set_step_lr(ctx: StepContext) -> None:
            lr = lr_at(cfg.optim, ctx.epoch, ctx.step, ctx.steps_per_epoch) * setup.lr_factor
            set_lr(self.optimizer, lr)

        def inspect(ctx: StepContext):
            return self.term_grads if every and st.global_step % every == 0 else None

        def record(out, batch, n: int) -> dict[str, Any]:
            if out.grads:
                st.grad_meter.add(out.grads, 1, keep=out.keep)
                log.scalars(out.grads, st.global_step)
            values = {f"loss.{k}": v for k, v in out.terms.items()}
            values["loss.total"] = out.total
            values.update({f"metric.{k}": v for k, v in d.metrics.items()})
            if batch.labels is not None and out.logits is not None:
                top1 = topk_correct(out.logits, batch.labels, (1,))[0].float() * (100.0 / n)
                values["train.top1"] = top1
            st.meter.add(values, n, keep=out.keep)
            st.global_step += 1
            return values

        epoch = st.epoch
        stats = loop.run(
            self.iterator.epoch(epoch, start_step=st.step),
            st,
            steps=setup.steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.optim.epochs}",
            context=lambda step: setup.main_context(epoch, step),
            record=record,
            before_step=set_step_lr,
            inspect=inspect,
            at=(len(self.distiller.init_stages()), epoch),
        )
        self._end_epoch(log, stats.images, stats.seconds)

    def _check_nonfinite(self) -> None:
        """Read the step's non-finite state (a device read in deferred mode: only at boundaries)."""
        self._after_refusal(self.train_step.status())

    def _after_refusal(self, status: NonFiniteStatus) -> None:
        self.state.skipped = status.skipped
        if status.halted:
            self._halt(status)

    def _halt(self, status: NonFiniteStatus) -> None:
        """Stop the run for a non-finite loss: summary.json says so, last.pt stays the last good state."""
        ctx = status.position
        if not isinstance(ctx, StepContext):
            ctx = self.setup.main_context(self.state.epoch, self.state.step)
        where = "" if ctx.stage == "main" else f"init stage {ctx.stage}, "
        values = ", ".join(str(v) for v in status.values)
        msg = (
            f"non-finite loss at {where}epoch {ctx.epoch + 1}, step {ctx.step + 1}: term(s) "
            f"{', '.join(status.terms)} = {values}"
        )
        if self.is_main:
            diverged = {"status": "diverged", "error": msg, "epoch": ctx.epoch}
            write_json(self.run_dir / "summary.json", diverged)
        raise NonFiniteLossError(
            f"{msg}. The step was refused; last.pt holds the last good state. Lower the learning rate or "
            "that term's weight, or pass --set train.on_nonfinite=skip to skip such batches."
        )

    def _end_epoch(self, log: MetricsLog | NullLog, images_seen: int, seconds: float) -> None:
        cfg, st = self.cfg, self.state
        self._check_nonfinite()
        record: dict[str, Any] = {
            "epoch": st.epoch,
            "lr": lr_at(cfg.optim, st.epoch, 0, self.steps_per_epoch) * self.setup.lr_factor,
        }
        record.update(st.meter.reduced().means())
        record.update(st.grad_meter.means())
        last_epoch = st.epoch + 1 == cfg.optim.epochs
        if self.setup.evaluated and ((st.epoch + 1) % cfg.train.eval_every == 0 or last_epoch):
            self._evaluate_networks(record)
        record["images_per_s"] = images_seen * self.dist.world_size / max(seconds, 1e-9)  # all ranks
        record["epoch_seconds"] = seconds
        record["wall_time"] = st.wall_before + (time.time() - self._t0)
        record["skipped_batches"] = st.skipped
        log.write(record, st.global_step)
        st.next_epoch()
        self.save()

    def _evaluate_networks(self, record: dict[str, Any]) -> None:
        """Evaluate every network; record its accuracy and keep its best checkpoint."""
        for i, (name, net) in enumerate(self.distiller.networks().items()):
            distributed.broadcast_buffers(net)  # rank 0's BatchNorm statistics: those its checkpoint holds
            res = self.evaluate(net)
            prefix = "test" if i == 0 else f"test.{name}"
            record.update({f"{prefix}.top1": res["top1"], f"{prefix}.top5": res["top5"]})
            record[f"{prefix}.loss"] = res["loss"]
            st = self.state
            best = st.best if i == 0 else st.best_networks.get(name, {"top1": -1.0})
            if res["top1"] <= best["top1"]:
                continue
            best = {"epoch": st.epoch, "top1": res["top1"], "top5": res["top5"]}
            if i == 0:
                st.best = best
                ck = self.checkpoint_state()
                state = {k: v for k, v in ck.items() if k not in ("optimizer", "rng", "meter")}
                if self.is_main:
                    atomic_save(state, self.run_dir / "best.pt")
            else:
                st.best_networks[name] = best
                if self.is_main:
                    atomic_save(self._network_state(name, net), self.run_dir / f"best_{name}.pt")

    def _network_state(self, name: str, net: torch.nn.Module) -> dict[str, Any]:
        """A checkpoint of one cohort network alone, loadable as a teacher or exportable."""
        info = self.setup.student_info
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": net.state_dict(),
            "arch": self.distiller.network_arch(name) or "?",
            "num_classes": info.num_classes,
            "in_channels": info.in_channels,
            "network": name,
            "epoch": self.state.epoch,
            "best": dict(self.state.best_networks[name]),
            "config": self.cfg.model_dump(mode="json"),
            "input": self.setup.input_spec(),
        }

    def evaluate(self, net: torch.nn.Module | None = None) -> dict[str, float]:
        """Test accuracy of ``net`` (default: the student); sharded over the ranks of a distributed run."""
        net = net if net is not None else self.distiller.student
        return evaluate_sharded(
            net, self.test_set, self.cfg.data.test_batch_size, self.device, self.memory_format
        )

    def finish(self, log: MetricsLog | NullLog) -> dict[str, Any]:
        """Write summary.json (rank 0) and return the summary (every rank, read back after rank 0 wrote)."""
        if not self.is_main:
            distributed.barrier()
            return json.loads((self.run_dir / "summary.json").read_text())
        try:
            return self._write_summary(log)
        finally:
            distributed.barrier()

    def _write_summary(self, log: MetricsLog | NullLog) -> dict[str, Any]:
        seconds = time.time() - self._t0
        summary = build_summary(self.setup, self.state, log.records(), seconds, self.extra_summary)
        write_json(self.run_dir / "summary.json", summary)
        return summary


def _counted(items, bar):
    for item in items:
        yield item
        bar.update(1)


def _method_views(distiller: Distiller, augment: Any, train_set: ImageDataset) -> dict[str, Any]:
    """The extra views the method declares, built from the run's training augmentation."""
    names = distiller.capabilities.views
    if not names:
        return {}
    base = augment if isinstance(augment, BatchAugment) else BatchAugment(train_set.mean, train_set.std)
    return build_views(names, base)
