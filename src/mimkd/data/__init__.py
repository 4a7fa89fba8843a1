"""Datasets as uint8 tensors in memory, batch augmentation on the training device, reproducible batches.

>>> from mimkd.data import load_dataset, BatchIterator, default_augment
>>> train = load_dataset("fashion_mnist")                      # doctest: +SKIP
>>> it = BatchIterator(train, 64, seed=0, augment=default_augment(train))  # doctest: +SKIP
>>> for images, labels, index in it.epoch(0): ...              # doctest: +SKIP
"""

from mimkd.data.augment import AugmentParams, BatchAugment, normalize, random_crop_flip, random_resized_crop
from mimkd.data.dataset import ImageDataset, channel_stats, resize_images
from mimkd.data.loader import Batch, BatchIterator, eval_batches, mix_seed
from mimkd.data.registry import (
    DatasetSpec,
    available_datasets,
    dataset_spec,
    default_augment,
    load_dataset,
    register_dataset,
)
from mimkd.data.subset import stratified_subset

__all__ = [
    "AugmentParams",
    "Batch",
    "BatchAugment",
    "BatchIterator",
    "DatasetSpec",
    "ImageDataset",
    "available_datasets",
    "channel_stats",
    "dataset_spec",
    "default_augment",
    "eval_batches",
    "load_dataset",
    "mix_seed",
    "normalize",
    "random_crop_flip",
    "random_resized_crop",
    "register_dataset",
    "resize_images",
    "stratified_subset",
]
