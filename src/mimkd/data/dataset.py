"""The in-memory dataset type every loader returns, and small helpers shared by the loaders.

A dataset is one contiguous ``uint8`` tensor of images (N×C×H×W) plus ``int64`` labels. Keeping the pixels as
``uint8`` keeps CIFAR-100 at 150 MB and lets the whole training set live in GPU memory, where batches are
gathered by index and augmented in one vectorised call (see :mod:`mimkd.data.augment`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mimkd.errors import DataError

__all__ = ["ImageDataset", "resize_images", "channel_stats"]


@dataclass
class ImageDataset:
    """Images and labels held in memory.

    Attributes:
        images: ``uint8`` tensor N×C×H×W (made contiguous on construction).
        labels: ``int64`` tensor of length N with values in ``[0, len(classes))``.
        classes: class names, index = label.
        mean: per-channel mean in [0, 1] units, used to normalise.
        std: per-channel standard deviation in [0, 1] units.
        name: the registry name of the dataset (``"cifar100"``, ``"folder"``, ...).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "dataset"
    split: str = field(default="train", compare=False)

    def __post_init__(self) -> None:
        what = f"dataset {self.name!r}"
        if not isinstance(self.images, torch.Tensor) or self.images.dtype != torch.uint8:
            raise DataError(f"{what}: images must be a uint8 tensor, got {_describe(self.images)}")
        if self.images.dim() != 4:
            raise DataError(f"{what}: images must be N×C×H×W, got shape {tuple(self.images.shape)}")
        if not isinstance(self.labels, torch.Tensor) or self.labels.dtype != torch.int64:
            raise DataError(f"{what}: labels must be an int64 tensor, got {_describe(self.labels)}")
        if self.labels.dim() != 1:
            raise DataError(f"{what}: labels must be one-dimensional, got shape {tuple(self.labels.shape)}")
        if len(self.images) != len(self.labels):
            raise DataError(f"{what}: {len(self.images)} images but {len(self.labels)} labels")
        self.classes = [str(c) for c in self.classes]
        if not self.classes:
            raise DataError(f"{what}: no classes")
        if len(self.labels) and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise DataError(
                f"{what}: labels must lie in [0, {len(self.classes) - 1}], found "
                f"[{int(self.labels.min())}, {int(self.labels.max())}]"
            )
        channels = self.images.shape[1]
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.mean) != channels or len(self.std) != channels:
            raise DataError(
                f"{what}: mean/std need one value per channel ({channels}), got {self.mean} / {self.std}"
            )
        if any(not s > 0 for s in self.std):
            raise DataError(f"{what}: std must be positive, got {self.std}")
        self.images = self.images.contiguous()
        self.labels = self.labels.contiguous()

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"image_shape={self.image_shape}, classes={self.num_classes}, device={self.images.device})"
        )

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageDataset:
        """A new dataset holding the images at ``indices`` (a copy, in the given order)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        if idx.dim() != 1:
            raise DataError(f"subset indices must be one-dimensional, got shape {tuple(idx.shape)}")
        if len(idx) and (int(idx.min()) < -len(self) or int(idx.max()) >= len(self)):
            raise DataError(f"subset index out of range for a dataset of {len(self)} images")
        idx = idx.to(self.images.device)
        return replace(self, images=self.images[idx], labels=self.labels[idx])

    def to(self, device: torch.device | str) -> ImageDataset:
        """The same dataset with images and labels on ``device`` (``self`` when already there)."""
        device = torch.device(device)
        if self.images.device == device and self.labels.device == device:
            return self
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))


def _describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor"
    return type(x).__name__


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 N×C×H×W tensor to N×C×size×size (bilinear, antialiased when shrinking).

    Non-square images are stretched; loaders of photographs crop to a square first. Works in chunks so the
    float intermediate stays small.
    """
    if images.shape[-2:] == (size, size):
        return images
    if size <= 0:
        raise DataError(f"image_size must be positive, got {size}")
    out = torch.empty((*images.shape[:2], size, size), dtype=torch.uint8, device=images.device)
    chunk = max(1, (1 << 23) // max(1, images.shape[1] * max(size * size, images[0, 0].numel())))
    shrink = size < min(images.shape[-2:])
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
        out[start : start + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of a uint8 image tensor, in [0, 1] units."""
    if len(images) == 0:
        raise DataError("cannot compute mean/std of an empty set of images")
    c = images.shape[1]
    chunk = max(1, (1 << 22) // max(1, images[0].numel()))
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].to(torch.float64).transpose(0, 1).reshape(c, -1)
        total += x.sum(1).cpu()
        total_sq += (x * x).sum(1).cpu()
    n = images.numel() / c
    mean = total / n
    var = (total_sq / n - mean * mean).clamp_min(0)
    std = var.sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    return tuple((mean / 255).tolist()), tuple((std / 255).tolist())


def uint8_from_numpy(array: np.ndarray) -> torch.Tensor:
    """A writable, contiguous uint8 tensor holding ``array`` (copied when numpy's buffer is read-only)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


def check_dir(path: Path, what: str, hint: str = "") -> Path:
    """Return ``path`` if it is a directory, else raise a DataError naming it (and ``hint``)."""
    if not path.is_dir():
        state = "is not a directory" if path.exists() else "does not exist"
        raise DataError(
            f"{what}: expected a directory at {path}, but it {state}.{' ' + hint if hint else ''}"
        )
    return path


def check_file(path: Path, what: str, hint: str = "") -> Path:
    """Return ``path`` if it is a file, else raise a DataError naming it (and ``hint``)."""
    if not path.is_file():
        state = "is not a file" if path.exists() else "does not exist"
        raise DataError(f"{what}: expected the file {path}, but it {state}.{' ' + hint if hint else ''}")
    return path
