"""Augmentations that run on whole batches, on the device the batch lives on.

Every random number is drawn from a CPU :class:`torch.Generator` passed by the caller and only then moved to
the images' device, so a given seed produces the same crops and flips on CPU and GPU. There is no loop over
samples: a random crop with padding and a horizontal flip are one gather, a random resized crop is one
``affine_grid`` + ``grid_sample`` call.

The random parameters are drawn separately from their application (:meth:`BatchAugment.sample`,
:meth:`BatchAugment.apply`), so the data loader can draw them for a whole distributed global batch and apply
only each rank's slice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mimkd.errors import DataError

__all__ = [
    "AugmentParams",
    "to_device",
    "BatchAugment",
    "normalize",
    "random_crop_flip",
    "random_resized_crop",
    "sample_resized_crop_boxes",
]


class AugmentParams(NamedTuple):
    """Per-sample random parameters of one batch (CPU tensors; ``None`` where the step is off).

    Attributes:
        boxes: B×4 float64 ``(top, left, height, width)`` of a random resized crop, in pixels.
        offsets: B×2 int64 ``(dy, dx)`` of the crop window in the zero-padded image, in ``[0, 2·padding]``.
        flip: B bool, flip horizontally.
    """

    boxes: torch.Tensor | None
    offsets: torch.Tensor | None
    flip: torch.Tensor | None

    def take(self, start: int, stop: int) -> AugmentParams:
        """The parameters of samples ``start:stop``."""
        return AugmentParams(*(None if t is None else t[start:stop] for t in self))


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; a CPU tensor goes to a GPU through pinned memory without blocking the host."""
    device = torch.device(device)
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


_STATS: dict[tuple[tuple[float, ...], torch.device], torch.Tensor] = {}


def _stats(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-channel constants as a 1×C×1×1 float32 tensor on ``like``'s device (cached: no copy per batch)."""
    key = (tuple(float(v) for v in values), like.device)
    out = _STATS.get(key)
    if out is None:
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            out = to_device(torch.tensor(key[0], dtype=torch.float32), like.device).view(1, -1, 1, 1)
        _STATS[key] = out
    return out


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``(images / 255 - mean) / std`` as float32, for uint8 (or 0..255 float) N×C×H×W images."""
    if images.dim() != 4:
        raise DataError(f"normalize expects N×C×H×W images, got shape {tuple(images.shape)}")
    if len(mean) != images.shape[1] or len(std) != images.shape[1]:
        raise DataError(
            f"mean/std have {len(mean)}/{len(std)} values but the images {images.shape[1]} channels"
        )
    m = _stats(mean, images)
    s = _stats(std, images)
    x = images.to(torch.float32)
    if x is images:  # never modify the caller's tensor in place
        x = x.clone()
    return x.div_(255.0).sub_(m).div_(s)


def random_crop_flip(
    images: torch.Tensor,
    padding: int,
    flip: bool,
    generator: torch.Generator | None = None,
    *,
    offsets: torch.Tensor | None = None,
    flips: torch.Tensor | None = None,
) -> torch.Tensor:
    """Zero-pad by ``padding``, crop back to the input size at a random offset, flip with p = 0.5.

    Per sample, vectorised. Random numbers come from ``generator`` (a CPU generator) unless ``offsets``/
    ``flips`` are given. The output has the input's dtype; crop and flip together are a single gather.
    """
    if (offsets is None and padding > 0) or (flips is None and flip):
        drawn_offsets, drawn_flips = _draw_crop_flip(images.shape[0], padding, flip, generator)
        offsets = drawn_offsets if offsets is None else offsets
        flips = drawn_flips if flips is None else flips
    return _crop_flip(images, padding, offsets if padding > 0 else None, flips if flip else None)


def _draw_crop_flip(
    n: int, padding: int, flip: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Crop offsets in [0, 2·padding] (n×2) and flip decisions (n), drawn in this order on the CPU."""
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator) if padding > 0 else None
    flips = torch.rand(n, generator=generator) < 0.5 if flip else None
    return offsets, flips


def _crop_flip(
    images: torch.Tensor, padding: int, offsets: torch.Tensor | None, flips: torch.Tensor | None
) -> torch.Tensor:
    if offsets is None and flips is None:
        return images
    n, c, h, w = images.shape
    dev = images.device
    if offsets is None:  # flip only
        f = to_device(flips, dev).view(n, 1, 1, 1)
        return torch.where(f, images.flip(-1), images)
    offsets = to_device(offsets, dev)
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    cols = ar_w.expand(n, w)
    if flips is not None:
        cols = torch.where(to_device(flips, dev).view(n, 1), ar_w.flip(0).expand(n, w), cols)
    rows = offsets[:, 0:1] + ar_h  # n×h, indices into the padded image
    cols = offsets[:, 1:2] + cols  # n×w
    padded = F.pad(images, (padding, padding, padding, padding))
    # One gather over the flattened padded plane (faster on CPU than a 4-index advanced-indexing gather;
    # timings: results/dev_cpu_notes.md).
    wp = w + 2 * padding
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.view(n, c, -1).gather(2, flat).view(n, c, h, w)


def sample_resized_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> torch.Tensor:
    """Crop boxes ``(top, left, height, width)`` following torchvision's ``RandomResizedCrop.get_params``.

    Vectorised: ``attempts`` candidates per sample are drawn at once and the first that fits is kept; samples
    with none fall back to the central crop with the aspect ratio clamped to ``ratio``. Returns n×4 float64.
    """
    area = height * width
    target = area * torch.empty(n, attempts, dtype=torch.float64).uniform_(
        scale[0], scale[1], generator=generator
    )
    log_r = torch.empty(n, attempts, dtype=torch.float64).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    u = torch.rand(n, 2, dtype=torch.float64, generator=generator)
    aspect = log_r.exp()
    w = (target * aspect).sqrt().round()
    h = (target / aspect).sqrt().round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.to(torch.int8).argmax(1, keepdim=True)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    found = ok.any(1)
    # Fallback: the whole image, cut to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w = torch.where(found, w, torch.full_like(w, fw))
    h = torch.where(found, h, torch.full_like(h, fh))
    top = torch.where(found, (u[:, 0] * (height - h + 1)).floor(), ((height - h) / 2).floor())
    left = torch.where(found, (u[:, 1] * (width - w + 1)).floor(), ((width - w) / 2).floor())
    return torch.stack([top, left, h, w], 1)


def _resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Float crop-and-resize of every image to size×size (bilinear), one grid_sample call."""
    n, c, h, w = images.shape
    top, left, bh, bw = boxes.to(torch.float64).unbind(1)
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = bw / w
    theta[:, 0, 2] = (2 * left + bw) / w - 1
    theta[:, 1, 1] = bh / h
    theta[:, 1, 2] = (2 * top + bh) / h - 1
    theta = to_device(theta.to(torch.float32), images.device)
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    x = images.to(torch.float32)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_resized_crop(
    images: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Batched ImageNet-style random resized crop to ``size``×``size`` (bilinear, no antialiasing).

    Returns the input dtype (uint8 results are rounded). Boxes are drawn on the CPU from ``generator``.
    """
    n, _, h, w = images.shape
    boxes = sample_resized_crop_boxes(n, h, w, scale, ratio, generator)
    out = _resized_crop(images, boxes, size)
    if images.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out.to(images.dtype)


class BatchAugment:
    """Training augmentation of a uint8 batch: [random resized crop], padded random crop, flip, normalise.

    ``aug(images_uint8, generator)`` returns normalised float32 images on the images' device. With
    ``resized_crop=S`` the batch is first cropped and resized to S×S (ImageNet-style) and ``crop_padding``
    is usually 0.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        crop_padding: int = 0,
        flip: bool = False,
        *,
        resized_crop: int | None = None,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        if crop_padding < 0:
            raise DataError(f"crop_padding must be >= 0, got {crop_padding}")
        if len(mean) != len(std):
            raise DataError(f"mean and std need the same number of channels, got {len(mean)} and {len(std)}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop_padding = int(crop_padding)
        self.flip = bool(flip)
        self.resized_crop = resized_crop
        self.scale = scale
        self.ratio = ratio

    def __repr__(self) -> str:
        rrc = f", resized_crop={self.resized_crop}" if self.resized_crop else ""
        return f"BatchAugment(crop_padding={self.crop_padding}, flip={self.flip}{rrc})"

    def sample(self, n: int, image_hw: tuple[int, int], generator: torch.Generator | None) -> AugmentParams:
        """Draw the random parameters of ``n`` images of size ``image_hw`` (CPU tensors)."""
        boxes = None
        if self.resized_crop:
            boxes = sample_resized_crop_boxes(n, *image_hw, self.scale, self.ratio, generator)
        offsets, flips = _draw_crop_flip(n, self.crop_padding, self.flip, generator)
        return AugmentParams(boxes, offsets, flips)

    def geometric(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Apply drawn parameters to ``images`` (same length) without normalising (0..255 values: uint8,
        or float after a resized crop)."""
        if images.dim() != 4:
            raise DataError(f"augmentation expects N×C×H×W images, got shape {tuple(images.shape)}")
        x = images
        if params.boxes is not None:
            x = _resized_crop(x, params.boxes, int(self.resized_crop))  # float 0..255
        return _crop_flip(x, self.crop_padding, params.offsets, params.flip)

    def apply(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Apply drawn parameters to ``images`` (same length) and normalise."""
        return normalize(self.geometric(images, params), self.mean, self.std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment and normalise a batch; random numbers from the CPU ``generator``."""
        return self.apply(images, self.sample(images.shape[0], tuple(images.shape[-2:]), generator))
