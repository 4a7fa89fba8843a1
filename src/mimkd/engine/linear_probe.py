"""Linear-probe transfer: ``mimkd probe`` (the protocol of the MIMKD paper's Table 3).

The student is frozen; its pre-classifier features are extracted once for the train and test splits of
another dataset (:mod:`mimkd.evaluation.probe`: input size, channels and normalisation adapted to the
student), and one ``nn.Linear`` trained on the cached training features is evaluated on the test features
(top-1, %). Its epochs run through the trainer's :class:`~mimkd.engine.loop.EpochLoop` (stage ``"probe"``).

Linear classifier (our choice; the paper does not state it): ``nn.Linear(feature_dim, classes)`` initialised
at zero (the probe is a convex problem, so zero is a neutral start and leaves the seed only the minibatch
order), plain SGD with momentum 0.9, weight decay 5e-4 (the CIFAR recipes' value; 0 is allowed), batch 256
(the last, smaller batch of an epoch kept), lr 0.1 decayed ×0.1 at 60 % and 80 % of the epochs (100 epochs →
milestones 60 and 80), cross-entropy on the raw (unstandardised) features. Minibatch order comes from a
:class:`torch.Generator` seeded with ``seed``, so a probe on CPU is bit-for-bit deterministic for a seed.

The result is a dict (written by :func:`write_probe_result` as JSON beside the checkpoint by the CLI):
``dataset, checkpoint, arch, feature_dim, train_images, test_images, epochs, lr, train_top1, test_top1,
seconds`` plus the protocol details (``image_size``, ``mean``, ``std``, ``weight_decay``, ...).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mimkd.data import Batch, ImageDataset, dataset_spec, eval_batches, stratified_subset
from mimkd.distillers.step_context import StepContext
from mimkd.errors import DataError, MimkdError
from mimkd.evaluation.probe import (
    classifier_input,
    extract_features,
    load_frozen_student,
    load_probe_split,
    resolve_checkpoint_file,
    student_input_spec,
)

from .logging import write_json
from .loop import Cursor, EpochLoop
from .setup import resolve_device
from .step import NonFiniteStatus, TrainStep

__all__ = ["linear_probe", "probe_milestones", "write_probe_result", "GAMMA", "MOMENTUM"]

#: The lr is multiplied by ``GAMMA`` at these fractions of the epochs.
MILESTONE_FRACTIONS = (0.6, 0.8)
GAMMA = 0.1
MOMENTUM = 0.9


def probe_milestones(epochs: int) -> list[int]:
    """Epochs after which the lr is multiplied by :data:`GAMMA`: 60 % and 80 % of ``epochs`` (floored;
    milestones outside ``[1, epochs - 1]`` are dropped)."""
    return sorted({m for m in (math.floor(f * epochs) for f in MILESTONE_FRACTIONS) if 1 <= m < epochs})


def _top1(head: nn.Linear, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> float:
    with torch.inference_mode():
        correct = sum(
            int((head(x[i : i + chunk]).argmax(1) == y[i : i + chunk]).sum()) for i in range(0, len(x), chunk)
        )
    return 100.0 * correct / len(x)


def linear_probe(
    checkpoint: str | Path,
    data: str,
    data_root: str | Path | None = None,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 256,
    weight_decay: float = 5e-4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    train_fraction: float = 1.0,
    test_fraction: float = 1.0,
    image_size: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """Linear-probe transfer of a frozen student: top-1 of a linear classifier trained on its
    pre-classifier features of ``data``'s train split, on ``data``'s test split.

    Args:
        checkpoint: a mimkd checkpoint file, or a run directory (its ``last.pt``; pass ``RUN/best.pt`` for the
            best epoch).
        data, data_root: the probe dataset (``mimkd datasets`` lists them) and its directory.
        epochs, lr, batch_size, weight_decay, seed: the linear classifier's SGD (momentum 0.9, lr ×0.1 at 60 %
            and 80 % of the epochs; see the module docstring).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        threads: CPU threads for torch (``torch.set_num_threads``; process-wide).
        train_fraction: a stratified subset (subset seed 0, fixed across probe seeds) of the probe's training
            split, for label-scarce transfer.
        test_fraction: a stratified subset of the test split — for smoke tests only; reports use 1.0.
        image_size, mean, std: override the student's training input size / normalisation (needed only for
            checkpoints that do not record their training data).

    Returns:
        ``{"dataset", "checkpoint", "arch", "feature_dim", "train_images", "test_images", "epochs", "lr",
        "train_top1", "test_top1", "seconds", ...}`` with accuracies in %.
    """
    t0 = time.perf_counter()
    _check_arguments(epochs, lr, batch_size, weight_decay, train_fraction, test_fraction)
    spec = dataset_spec(data)  # an unknown name fails here, before any loading, listing the known ones
    dev = resolve_device(str(device))
    if threads:
        torch.set_num_threads(threads)
    path = resolve_checkpoint_file(checkpoint)
    net, ck, arch = load_frozen_student(path)
    channels = int(ck["in_channels"])
    size, m, s, trained_on = student_input_spec(path, ck, channels, image_size=image_size, mean=mean, std=std)
    train, test = _splits(spec.name, data_root, size, channels, m, s, train_fraction, test_fraction)

    net.to(dev)
    sample = next(eval_batches(train.subset(torch.arange(min(2, len(train)))), 2, dev)).images
    point = classifier_input(net, sample)
    t_feat = time.perf_counter()
    x_train = extract_features(net, point, train, 256, dev)
    x_test = extract_features(net, point, test, 256, dev)
    y_train, y_test = train.labels.to(dev), test.labels.to(dev)
    feature_seconds = time.perf_counter() - t_feat

    dim, classes = x_train.shape[1], train.num_classes
    head = nn.Linear(dim, classes).to(dev)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    milestones = probe_milestones(epochs)
    _train_head(head, x_train, y_train, epochs, lr, batch_size, weight_decay, milestones, seed)

    return {
        "dataset": spec.name,
        "data_root": str(data_root) if data_root is not None else None,
        "checkpoint": str(path),
        "arch": arch,
        "feature_dim": int(dim),
        "train_images": len(train),
        "test_images": len(test),
        "epochs": epochs,
        "lr": lr,
        "train_top1": _top1(head, x_train, y_train),
        "test_top1": _top1(head, x_test, y_test),
        "seconds": time.perf_counter() - t0,
        "feature_seconds": feature_seconds,
        "feature_point": point,
        "classes": classes,
        "image_size": size,
        "channels": channels,
        "mean": list(m),
        "std": list(s),
        "student_data": trained_on,
        "batch_size": batch_size,
        "weight_decay": weight_decay,
        "momentum": MOMENTUM,
        "milestones": milestones,
        "gamma": GAMMA,
        "seed": seed,
        "train_fraction": train_fraction,
        "test_fraction": test_fraction,
    }


def _check_arguments(
    epochs: int, lr: float, batch_size: int, weight_decay: float, train_fraction: float, test_fraction: float
) -> None:
    for what, v in (("train_fraction", train_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < v <= 1.0:
            raise DataError(f"{what} must lie in (0, 1], got {v}")
    if epochs < 1 or batch_size < 1 or not lr > 0 or weight_decay < 0:
        raise MimkdError(
            f"need epochs >= 1, batch_size >= 1, lr > 0 and weight_decay >= 0; got epochs {epochs}, "
            f"batch_size {batch_size}, lr {lr}, weight_decay {weight_decay}"
        )


def _splits(
    name: str,
    root: str | Path | None,
    size: int,
    channels: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    train_fraction: float,
    test_fraction: float,
) -> tuple[ImageDataset, ImageDataset]:
    """The probe's train and test splits, adapted to the student, subsampled (stratified, seed 0)."""
    train = load_probe_split(name, root, "train", size, channels, mean, std)
    test = load_probe_split(name, root, "test", size, channels, mean, std)
    if train.classes != test.classes:
        raise DataError(f"{name!r}: the train and test splits have different classes")
    if train_fraction < 1.0:
        train = train.subset(stratified_subset(train.labels, train_fraction, 0))
    if test_fraction < 1.0:
        test = test.subset(stratified_subset(test.labels, test_fraction, 0))
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"{name!r}: an empty split ({len(train)} train, {len(test)} test images)")
    return train, test


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, gen: torch.Generator):
    """One epoch of the cached features in a seeded order (the last, smaller batch kept)."""
    perm = torch.randperm(len(x), generator=gen).to(x.device)
    for start in range(0, len(x), batch_size):
        idx = perm[start : start + batch_size]
        yield Batch(x[idx], y[idx], idx)


def _diverged(lr: float):
    def on_status(status: NonFiniteStatus) -> None:
        if status.halted:
            ctx = status.position
            raise MimkdError(
                f"the linear probe diverged (loss {status.values[0]} in epoch {ctx.epoch + 1}): lower the lr "
                f"(--lr, now {lr})"
            )

    return on_status


def _train_head(
    head: nn.Linear,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    milestones: list[int],
    seed: int,
) -> None:
    """SGD on the linear head over the cached features, epochs run by the trainer's EpochLoop."""
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=GAMMA)

    def model(features, labels, index, ctx):
        logits = head(features)
        return logits, {"ce": F.cross_entropy(logits, labels)}

    loop = EpochLoop(TrainStep(model, opt, check="step"), on_status=_diverged(lr), progress=False)
    gen = torch.Generator().manual_seed(int(seed))
    steps = math.ceil(len(x) / batch_size)
    for epoch in range(epochs):
        loop.run(
            _batches(x, y, batch_size, gen),
            Cursor(),
            steps=steps,
            desc=f"probe {epoch + 1}/{epochs}",
            context=lambda s, e=epoch: StepContext("probe", e, s, steps, epochs),
            record=lambda out, batch, n: {"loss.ce": out.total},
        )
        sched.step()


def write_probe_result(result: dict[str, Any], path: str | Path) -> Path:
    """Write ``result`` as JSON to ``path`` atomically (temp file + rename); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_json(p, result)
    return p
