"""Data-parallel training under ``torchrun`` (DistributedDataParallel; NCCL on CUDA, gloo on a CPU).

``torchrun --nproc_per_node N -m mimkd distill ...`` starts N processes with ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` set; :func:`session` reads them, initialises the process group and picks each process's device
(``cuda:LOCAL_RANK``, or the CPU). Without those variables (or with ``WORLD_SIZE=1``) everything here is a
no-op and a run is the ordinary single-process one.

Design (what :class:`~mimkd.engine.trainer.Trainer` does with it):

* **Batches.** ``optim.batch_size`` is per process; the global batch is ``batch_size × world_size``. Every
  rank draws the same seeded global permutation and global augmentation parameters and takes its contiguous
  slice (:class:`~mimkd.data.BatchIterator` ``rank``/``world_size``), so an N-process run sees, step by step,
  exactly the samples of a 1-process run with batch ``N × batch_size``. ``optim.scale_lr`` multiplies the
  learning rate by N (linear scaling); off by default.
* **Gradients.** The distiller is wrapped in :func:`wrap` (DDP, ``static_graph=True``: methods whose modules
  are partly unused in the main stage, e.g. init-stage connectors, need no ``find_unused_parameters`` graph
  walk, and a refused non-finite step may skip its backward). The frozen teacher and the memory banks are
  excluded from DDP (``_ddp_params_and_buffers_to_ignore``): the banks are kept identical on every rank by
  their own gather (:meth:`mimkd.mi.memory.MemoryBank.update`), and DDP's per-forward buffer broadcast would
  otherwise copy N×D floats each step for nothing. Other buffers (BatchNorm statistics) are broadcast from
  rank 0 at each forward, DDP's default. Init stages (FitNets hints, AB, FT, FSP) run outside DDP and
  average their gradients with :func:`all_reduce_gradients`.
* **Memory banks and negatives** (CRD, MIMKD's global term, WCoRD). Every rank scores its anchors against
  its bank, then :meth:`~mimkd.mi.memory.MemoryBank.update` all-gathers the indices and embeddings of every
  rank and applies them all, so the banks stay identical on every rank (and equal to a 1-process bank at
  the global batch). :meth:`~mimkd.mi.memory.ClassAwareNegativeSampler.sample` all-gathers the anchors and
  draws the negatives of the whole global batch from the global RNG, which is in the same state on every
  rank (same seed, same draws), and each rank keeps its rows: the negatives are those of the 1-process run.
  CRD's normalising constant ``Z`` is fixed from the mean over the global batch.
* **Per-rank terms.** Everything computed within a batch is computed within the rank's batch, as DDP does:
  BatchNorm statistics (student, and MIMKD's projection heads) unless ``train.sync_bn`` (CUDA only), the
  in-batch negatives of MIMKD's local/feature JSD terms (a derangement of the rank's batch), WCoRD's
  in-batch OT plan, and the relational losses (RKD, SP, CC, PKT). Dropout masks come from the same RNG
  state on every rank. A 2-process run equals the 1-process run at the global batch exactly for methods
  without such terms (tests/test_distributed.py: kd, crd with a BatchNorm-free student).
* **Evaluation** is sharded: each rank evaluates its contiguous share of the test set with rank 0's
  BatchNorm statistics (broadcast first; those its checkpoint holds) and the counts are summed, so every
  rank has the same accuracy and the same best epoch.
* **Writes.** Only rank 0 writes (config.yaml, metrics.jsonl, TensorBoard, last.pt/best.pt, summary.json, the
  progress bar); every rank reads ``last.pt`` on resume. A checkpoint must be resumed with the same number
  of processes (the global batch and the step positions depend on it).
* **Shut-down.** :func:`session` calls ``dist.barrier()`` before ``destroy_process_group()``: with gloo under
  torchrun, destroying the group right after the last collective aborted one rank in 4 of 12 runs (0 of 11
  with the barrier).
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn

from mimkd.data import eval_batches
from mimkd.errors import ConfigError
from mimkd.evaluation.accuracy import evaluate

if TYPE_CHECKING:
    from mimkd.data import ImageDataset

__all__ = [
    "DistInfo",
    "all_reduce_gradients",
    "all_reduce_sum",
    "barrier",
    "broadcast_buffers",
    "broadcast_object",
    "current",
    "env_info",
    "evaluate_sharded",
    "is_main_process",
    "session",
    "wrap",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the run: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when several processes train together (a process group is initialised)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that writes files."""
        return self.rank == 0


SINGLE = DistInfo()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"environment variable {name}={value!r} is not an integer (set by torchrun)"
        ) from None


def env_info() -> DistInfo:
    """The rank layout torchrun put in the environment (a single process when it did not)."""
    world = _env_int("WORLD_SIZE")
    if world is None or world <= 1:
        return SINGLE
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    if rank is None:
        raise ConfigError("WORLD_SIZE is set but RANK is not: start distributed runs with torchrun")
    return DistInfo(rank=rank, world_size=world, local_rank=local if local is not None else rank)


def current() -> DistInfo:
    """The layout of the initialised process group (a single process when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=_env_int("LOCAL_RANK") or 0,
        backend=str(dist.get_backend()),
    )


def is_main_process() -> bool:
    """True unless this is a non-zero rank of an initialised process group (e.g. for printing once)."""
    return current().is_main if current().enabled else env_info().is_main


def process_device(requested: str, info: DistInfo) -> torch.device:
    """The device of this process: ``auto``/``cuda``/``cuda:N`` become ``cuda:LOCAL_RANK`` under torchrun."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(requested)
    except RuntimeError:
        raise ConfigError(f"device: {requested!r} is not a device (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device: {requested!r} requested but CUDA is not available here; use --device cpu"
            )
        if info.enabled:
            if info.local_rank >= torch.cuda.device_count():
                raise ConfigError(
                    f"LOCAL_RANK {info.local_rank} has no GPU: {torch.cuda.device_count()} visible; start at "
                    "most that many processes per node (torchrun --nproc_per_node)"
                )
            dev = torch.device("cuda", info.local_rank)
    elif dev.type != "cpu" and info.enabled:
        raise ConfigError(f"device: {requested!r}: distributed training runs on cuda or cpu")
    return dev


@contextlib.contextmanager
def session(requested_device: str) -> Iterator[tuple[DistInfo, torch.device]]:
    """Initialise the process group when torchrun started several processes; yield (layout, device).

    NCCL on CUDA, gloo on a CPU. Python warnings are shown by rank 0 only (every rank builds the same run,
    so the others would repeat them). On normal exit every rank meets at a barrier before the group is
    destroyed (see the module docstring); on an error the group is destroyed without waiting for the others
    (torchrun stops the remaining workers).
    """
    info = env_info()
    device = process_device(requested_device, info)
    if not info.enabled or (dist.is_available() and dist.is_initialized()):
        yield (current() if info.enabled else SINGLE), device
        return
    if not dist.is_available():
        raise ConfigError("this PyTorch build has no torch.distributed: run a single process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict = {"backend": backend, "timeout": timedelta(minutes=30)}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    ok = False
    try:
        with warnings.catch_warnings():
            if not info.is_main:  # every rank builds the same run: its warnings are rank 0's, shown once
                warnings.simplefilter("ignore")
            yield DistInfo(info.rank, info.world_size, info.local_rank, backend), device
        ok = True
    finally:
        if ok:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """``dist.barrier()`` when several processes run; nothing otherwise."""
    if current().enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over the ranks in place (and return it); unchanged in a single process."""
    if current().enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled; for small state such as an offline pass's result)."""
    if not current().enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm statistics) of ``module`` to every rank."""
    if not current().enabled:
        return
    for b in module.buffers():
        dist.broadcast(b.data, src=src)


def all_reduce_gradients(params: Iterable[torch.Tensor]) -> None:
    """Average the gradients of ``params`` over the ranks (one flat all-reduce per dtype).

    Every rank must pass the same parameters; a missing gradient counts as zero (it is materialised).
    """
    info = current()
    if not info.enabled:
        return
    params = [p for p in params if p.requires_grad]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(info.world_size)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def _ignored_names(distiller: nn.Module) -> list[str]:
    """Parameters and buffers DDP must leave alone: what the distiller's ``ddp_ignored_names`` hook says
    (the frozen teacher's, the memory banks'); nothing for a module without the hook."""
    hook = getattr(distiller, "ddp_ignored_names", None)
    return list(hook()) if callable(hook) else []


def wrap(distiller: nn.Module, device: torch.device) -> nn.Module:
    """``distiller`` wrapped in DistributedDataParallel (see the module docstring); itself when single."""
    if not current().enabled:
        return distiller
    from torch.nn.parallel import DistributedDataParallel as DDP

    ignored = set(_ignored_names(distiller))
    if not any(p.requires_grad for n, p in distiller.named_parameters() if n not in ignored):
        raise ConfigError("nothing to train: the distiller has no trainable parameters")
    for param in distiller.parameters():
        # A 1×1 kernel in channels_last has strides that autograd does not reproduce in its gradient (it
        # returns the contiguous ones, the same memory order): DDP would copy such gradients into its
        # buckets every step and warn. Give those parameters the contiguous strides.
        if param.dim() == 4 and param.shape[2] == param.shape[3] == 1 and not param.is_contiguous():
            param.data = param.data.contiguous()
    DDP._set_params_and_buffers_to_ignore_for_model(distiller, sorted(ignored))
    ids = [device.index] if device.type == "cuda" else None
    return DDP(distiller, device_ids=ids, static_graph=True)


def check_sync_bn(enabled: bool, device: torch.device, info: DistInfo) -> bool:
    """Whether to convert BatchNorm layers to SyncBatchNorm; a clear error where torch cannot run it."""
    if not enabled or not info.enabled:
        return False  # one process: its BatchNorm already sees the whole batch
    if device.type != "cuda":
        raise ConfigError(
            f"train.sync_bn: SyncBatchNorm runs on CUDA only in this PyTorch ({torch.__version__}: "
            "'SyncBatchNorm expected input tensor to be on GPU'); on a CPU each process normalises its own "
            "batch: drop --set train.sync_bn=true"
        )
    return True


def evaluate_sharded(
    net: torch.nn.Module,
    dataset: ImageDataset,
    batch_size: int,
    device: torch.device,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, float]:
    """:func:`~mimkd.evaluation.accuracy.evaluate` over ``dataset``, sharded over the ranks of a distributed
    run (each rank its contiguous share; the counts summed), on every rank the same result."""
    info = current()
    batches = eval_batches(dataset, batch_size, device, rank=info.rank, world_size=info.world_size)
    res = evaluate(net, batches, memory_format)
    if not info.enabled:
        return res
    n = len(dataset) * (info.rank + 1) // info.world_size - len(dataset) * info.rank // info.world_size
    counts = torch.tensor(
        [round(res["top1"] * n / 100.0), round(res["top5"] * n / 100.0), res["loss"] * n, n],
        dtype=torch.float64,
        device=device,
    )
    all_reduce_sum(counts)
    c1, c5, loss, total = counts.tolist()
    return {"top1": 100.0 * c1 / total, "top5": 100.0 * c5 / total, "loss": loss / total}
