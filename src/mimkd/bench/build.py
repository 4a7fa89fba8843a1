"""Building the rows of ``mimkd bench`` (:mod:`mimkd.bench.timing`): the setup, synthetic batches, a
teacher with calibrated BatchNorm statistics, and one ready-to-call step per row (the trainer's
:class:`~mimkd.engine.step.TrainStep` for the student and method rows, an inference forward for the teacher).
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "STUDENT_ROW",
    "TEACHER_ROW",
    "BenchSetup",
    "synthetic_batch",
    "calibrated_teacher",
    "build_row",
    "sync",
    "free_memory",
]

STUDENT_ROW = "student step"
TEACHER_ROW = "teacher forward"


@dataclass
class BenchSetup:
    """Everything that defines a measurement (JSON-serialisable: a row subprocess receives it)."""

    teacher: str
    student: str
    input_shape: tuple[int, int, int] = (3, 32, 32)
    num_classes: int = 100
    num_train: int = 50000  # bank size of memory-bank methods, and the labels' length
    batch_size: int = 64
    steps: int = 20
    warmup: int = 5
    device: str = "cpu"
    threads: int | None = None
    channels_last: bool = True
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> its options
    row_seconds: float | None = None  # stop timing a row after this long (at least 3 timed steps)
    ceiling_n: int | None = None  # side of the ceiling's matmul (None: matmul_ceiling's default)
    precision: str = "fp32"  # "bf16": autocast in the forward (train.precision)
    compile: bool = False  # torch.compile through compile_distiller (train.compile)
    seed: int = 0


def synthetic_batch(s: BenchSetup, batch: int, dev: torch.device, g: torch.Generator):
    """Synthetic uint8-range images (normalised), labels and dataset indices, on ``dev``."""
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    raw = torch.randint(0, 256, (batch, *s.input_shape), generator=g, dtype=torch.uint8)
    x = ((raw.float() / 255.0 - 0.5) / 0.25).contiguous(memory_format=fmt)
    y = torch.randint(0, s.num_classes, (batch,), generator=g)
    if batch <= s.num_train:
        idx = torch.randperm(s.num_train, generator=g)[:batch]
    else:
        idx = torch.randint(0, s.num_train, (batch,), generator=g)
    return x.to(dev), y.to(dev), idx.to(dev)


@torch.no_grad()
def calibrated_teacher(s: BenchSetup, x: torch.Tensor) -> nn.Module:
    """The untrained teacher with BatchNorm statistics calibrated on ``x`` (on the CPU, up to 256 images).

    A fresh network in eval mode normalises with BN's initial statistics (mean 0, variance 1), so its
    activations grow block after block; losses on raw teacher features (CC) then overflow within steps. A
    trained teacher's statistics fit its activations; calibrating gives the untrained one the same property.
    """
    from mimkd.models import build_network

    t = build_network(s.teacher, s.num_classes, s.input_shape[0]).train()
    bns = [m for m in t.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.momentum = None  # cumulative average over the calibration passes
    sample = x[:256].cpu()
    for _ in range(3):
        t(sample)
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    return t.eval()


def build_row(s: BenchSetup, row: str, batch: int, dev: torch.device, use_compile: bool | None = None):
    """(step function, info) for ``row``; the step closes over its module, optimiser and batch.
    ``info["check"]`` raises a NonFiniteLossError if a step's loss was non-finite."""
    from mimkd.bench.report import split_row
    from mimkd.config import OptimConfig
    from mimkd.distillers import build_distiller, get_method
    from mimkd.engine.recipe import build_optimizer
    from mimkd.engine.step import TrainStep, compile_distiller, resolve_check
    from mimkd.models import build_network

    torch.manual_seed(s.seed)
    g = torch.Generator().manual_seed(s.seed + 1)
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    x, y, idx = synthetic_batch(s, batch, dev, g)
    ch = s.input_shape[0]
    if row == TEACHER_ROW:
        t = calibrated_teacher(s, x).to(device=dev, memory_format=fmt).eval()
        if s.compile if use_compile is None else use_compile:
            t.compile()
        bf16 = s.precision == "bf16"

        def forward() -> None:
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                t(x)

        n = sum(p.numel() for p in t.parameters())
        info = {"params": n, "trainable_params": 0, "method_params": 0, "init_stages": []}
        return forward, {**info, "check": lambda: None}
    method, inline = ("vanilla", {}) if row == STUDENT_ROW else split_row(row)
    cls = get_method(method)
    student = build_network(s.student, s.num_classes, ch)
    teacher = calibrated_teacher(s, x) if cls.requires_teacher else None
    sample = x[:8].cpu().contiguous()
    labels = torch.arange(s.num_train) % s.num_classes
    d = build_distiller(
        method,
        student,
        teacher,
        sample,
        num_classes=s.num_classes,
        train_labels=labels,
        student_arch=s.student,
        **{**s.options.get(method, {}), **inline},
    )
    if not d.offline_ready():  # KDEP's statistics over the training images: synthetic ones, untimed
        ob = min(batch, 256)
        n_batches = max(2, math.ceil(512 / ob))
        d.offline_pass(
            (synthetic_batch(s, ob, torch.device("cpu"), g)[0] for _ in range(n_batches)), n_batches, None
        )
    d = d.to(device=dev, memory_format=fmt).train()
    params = [p for _, p in d.trainable_named_parameters()]
    check = resolve_check("auto", dev)  # as the trainer: per step on CPU, deferred on CUDA
    sgd = OptimConfig(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=False, weight_decay=5e-4)
    opt = build_optimizer(sgd, params, fused=check == "deferred")
    if s.compile if use_compile is None else use_compile:
        compile_distiller(d)
    train_step = TrainStep(d, opt, precision=s.precision, check=check)
    labels_in = y if d.uses_labels else None  # a label-free method's batches have none (trainer)
    # extra views (MLKD's strong view): synthetic batches like the primary one; as for the primary view, the
    # augmentation that makes them is data time, not step time
    views = {name: synthetic_batch(s, batch, dev, g)[0] for name in d.capabilities.views}

    def check_finite() -> None:
        st = train_step.status()
        if st.halted:
            from mimkd.errors import NonFiniteLossError

            values = ", ".join(f"{t} = {v:.3g}" for t, v in zip(st.terms, st.values))
            raise NonFiniteLossError(f"{method}: non-finite loss in a benchmark step ({values})")

    trainable = sum(p.numel() for p in params)
    own = sum(p.numel() for p in student.parameters() if p.requires_grad)
    info = {
        "params": trainable,
        "trainable_params": trainable,
        "method_params": trainable - own,
        "init_stages": [[st.name, st.epochs] for st in d.init_stages()],
        "check": check_finite,
    }
    return (lambda: train_step(x, labels_in, idx, views=views)), info


def sync(dev: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on a CPU."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free_memory(dev: torch.device) -> None:
    """Collect garbage and return cached CUDA blocks, so the next row starts from a clean slate."""
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
