"""scikit-learn's 8×8 handwritten digits (1,797 images, bundled with scikit-learn, no download).

Pixel values 0..16 are scaled to 0..255. The train/test split is a fixed stratified 80/20 split (seed
:data:`SPLIT_SEED`), so it is the same on every machine. Mean/std are computed from the training split at the
requested image size (pass ``mean``/``std`` to use another model's normalisation, e.g. Fashion-MNIST's when
probing a Fashion-MNIST model with ``image_size=28``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mimkd.data.dataset import ImageDataset, channel_stats, resize_images, uint8_from_numpy
from mimkd.data.registry import DatasetSpec, register_dataset
from mimkd.data.subset import stratified_subset
from mimkd.errors import DataError

SPLIT_SEED = 20240607
TEST_FRACTION = 0.2


@register_dataset(
    "digits",
    num_classes=10,
    mean=None,
    std=None,
    image_size=8,
    crop_padding=1,
    flip=False,
    needs_root=False,
    channels=1,
    train_size=1438,
)
def load_digits_dataset(
    spec: DatasetSpec, root: Path | None, split: str, image_size: int | None
) -> ImageDataset:
    """The digits as N×1×8×8 (or ``image_size``, bilinear); ``root`` is ignored. Splits: train / test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    pixels = np.rint(np.asarray(bunch.data, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255)
    images = uint8_from_numpy(pixels.reshape(-1, 1, 8, 8))
    labels = torch.as_tensor(np.asarray(bunch.target), dtype=torch.int64)
    if image_size is not None:
        images = resize_images(images, image_size)
    test_idx = stratified_subset(labels, TEST_FRACTION, seed=SPLIT_SEED)
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[test_idx] = True
    train_idx = (~is_test).nonzero().squeeze(1)
    mean, std = channel_stats(images[train_idx])
    idx = train_idx if split == "train" else test_idx
    return ImageDataset(
        images[idx], labels[idx], [str(i) for i in range(10)], mean, std, name=spec.name, split=split
    )
