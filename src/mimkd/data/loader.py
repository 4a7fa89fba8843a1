"""Batches gathered by index from a dataset held on the training device; reproducible without hidden state.

:class:`BatchIterator` owns no random state. The order of epoch ``e`` comes from a generator seeded with
``mix_seed(seed, 0, e)`` and the augmentation of step ``k`` from one seeded with ``mix_seed(seed, 1, e, k)``
(the ``i``-th extra view's from ``mix_seed(seed, 2, i, e, k)``);
so ``it.epoch(e, start_step=k)`` yields exactly the batches an uninterrupted ``it.epoch(e)`` yields from step
``k`` on, which is what an exact resume needs.

Placement: the uint8 dataset lives on ``storage_device`` (by default the training device, i.e. GPU memory
on a GPU) and batches are gathered and augmented there; with the dataset kept on the CPU for a GPU run
(``storage_device="cpu"``) each finished batch is copied through pinned memory without blocking. Every
host-to-device copy the iterator makes goes through pinned memory with ``non_blocking=True``, so building a
batch never waits for the GPU.

Distributed data parallel: the global batch is ``batch_size × world_size``; its indices and its augmentation
parameters are drawn exactly as for one process with batch ``batch_size × world_size``, and rank ``r`` takes
the ``r``-th contiguous slice. The union of the ranks' batches is therefore the single-process batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import NamedTuple

import torch

from mimkd.data.augment import BatchAugment, normalize, to_device
from mimkd.data.dataset import ImageDataset
from mimkd.errors import DataError

__all__ = ["Batch", "BatchIterator", "eval_batches", "mix_seed", "storage_device"]

_MASK64 = (1 << 64) - 1


class Batch(NamedTuple):
    """One batch on the device: normalised float images, labels (``None`` when hidden), dataset indices,
    and the extra views a method asked for (``{name: images}``, empty when none; :mod:`mimkd.data.views`)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    index: torch.Tensor
    views: Mapping[str, torch.Tensor] = MappingProxyType({})


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers with SplitMix64 (stable across runs, unlike ``hash()``)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h >> 1


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(mix_seed(*parts))


Augment = BatchAugment | Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class BatchIterator:
    """Epochs of shuffled, augmented batches gathered on ``device``.

    Args:
        dataset: the data; its uint8 images are moved to ``device`` once (GPU memory on a GPU).
        batch_size: images per batch per process.
        shuffle: random order per epoch (else dataset order).
        drop_last: drop the last, incomplete global batch.
        seed: the run's data seed.
        device: where batches are built and returned.
        augment: a :class:`BatchAugment` (or any ``f(uint8 images, generator) -> float images``); ``None``
            only normalises with the dataset's mean/std.
        with_labels: ``False`` hides the labels (``Batch.labels`` is ``None``; the iterator holds none).
        rank, world_size: this process's place in a data-parallel group.
        storage_device: where the uint8 images live and batches are built (default: ``device``).
        views: extra views ``{name: augment}`` of every batch (:func:`mimkd.data.views.build_views`), each
            applied to the same raw images as ``augment`` with its own random stream.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
        augment: Augment | None = None,
        with_labels: bool = True,
        rank: int = 0,
        world_size: int = 1,
        storage_device: torch.device | str | None = None,
        views: dict[str, Augment] | None = None,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        n = len(dataset)
        self.global_batch = batch_size * world_size
        if drop_last and n < self.global_batch:
            raise DataError(
                f"dataset {dataset.name!r} has {n} images, fewer than one global batch of "
                f"{self.global_batch} (batch_size {batch_size} × world_size {world_size}); lower the batch "
                "size or set drop_last=False"
            )
        if n == 0:
            raise DataError(f"dataset {dataset.name!r} is empty")
        self.device = torch.device(device)
        self.storage = torch.device(storage_device) if storage_device is not None else self.device
        self.images = dataset.images.to(self.storage)
        self.labels = dataset.labels.to(self.storage) if with_labels else None
        self.mean, self.std = dataset.mean, dataset.std
        self.num_samples = n
        self.batch_size = batch_size
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, int(seed)
        self.augment = augment
        self.views = dict(views or {})
        self.rank, self.world_size = rank, world_size
        self._steps = n // self.global_batch if drop_last else -(-n // self.global_batch)

    def __len__(self) -> int:
        return self._steps

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order of epoch ``epoch`` (CPU int64), a pure function of (seed, epoch)."""
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=_generator(self.seed, 0, epoch))

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Yield the batches of ``epoch`` from step ``start_step`` on."""
        if not 0 <= start_step <= self._steps:
            raise DataError(f"start_step must lie in [0, {self._steps}], got {start_step}")
        perm = to_device(self.permutation(epoch), self.storage)
        gb = self.global_batch
        for step in range(start_step, self._steps):
            g_start = step * gb
            g_len = min(gb, self.num_samples - g_start)
            lo = g_len * self.rank // self.world_size
            hi = g_len * (self.rank + 1) // self.world_size
            index = perm[g_start + lo : g_start + hi]
            window = (perm, g_start, g_len, lo, hi, index)
            images = self._images(self.augment, _generator(self.seed, 1, epoch, step), *window)
            views = {
                name: self._images(aug, _generator(self.seed, 2, i, epoch, step), *window)
                for i, (name, aug) in enumerate(self.views.items())
            }
            labels = self._labels(index)
            if self.storage != self.device:
                images, index = to_device(images, self.device), to_device(index, self.device)
                labels = to_device(labels, self.device) if labels is not None else None
                views = {k: to_device(v, self.device) for k, v in views.items()}
            yield Batch(images, labels, index, views)

    def _labels(self, index: torch.Tensor) -> torch.Tensor | None:
        return None if self.labels is None else self.labels.index_select(0, index)

    def _images(
        self,
        aug: Augment | None,
        gen: torch.Generator,
        perm: torch.Tensor,
        g_start: int,
        g_len: int,
        lo: int,
        hi: int,
        index: torch.Tensor,
    ) -> torch.Tensor:
        raw = self.images.index_select(0, index)
        if aug is None:
            return normalize(raw, self.mean, self.std)
        if hasattr(aug, "sample") and hasattr(aug, "apply"):  # drawn for the global batch, sliced per rank
            params = aug.sample(g_len, tuple(self.images.shape[-2:]), gen).take(lo, hi)
            return aug.apply(raw, params)
        if self.world_size == 1:
            return aug(raw, gen)
        # A foreign augmentation cannot be sliced: augment the whole global batch, keep this rank's part.
        whole = self.images.index_select(0, perm[g_start : g_start + g_len])
        return aug(whole, gen)[lo:hi]


def eval_batches(
    dataset: ImageDataset,
    batch_size: int,
    device: torch.device | str = "cpu",
    *,
    with_labels: bool = True,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Batch]:
    """Deterministic evaluation batches in dataset order: normalised, unaugmented, the last one kept.

    With ``world_size > 1`` rank ``r`` covers the ``r``-th contiguous share of the dataset (shares differ by
    at most one image), so the ranks together see every image exactly once. The images are moved to
    ``device`` on each call; pass a dataset already there (``dataset.to(device)``) to avoid the copy.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    ds = dataset.to(device)
    n = len(ds)
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    for start in range(lo, hi, batch_size):
        stop = min(start + batch_size, hi)
        index = torch.arange(start, stop, device=ds.images.device)
        labels = ds.labels[start:stop] if with_labels else None
        yield Batch(normalize(ds.images[start:stop], ds.mean, ds.std), labels, index)


def storage_device(setting: str | bool, dataset: ImageDataset, device: torch.device) -> torch.device:
    """Where the training set's uint8 images live (``train.data_on_device``): the GPU or the CPU.

    ``auto`` keeps them on the GPU when they take less than a quarter of its free memory. On a CPU device
    there is nothing to choose.
    """
    if device.type != "cuda" or setting is True:
        return device
    if setting is False:
        return torch.device("cpu")
    free, _ = torch.cuda.mem_get_info(device)
    need = dataset.images.numel() * dataset.images.element_size()
    return device if need < free // 4 else torch.device("cpu")
