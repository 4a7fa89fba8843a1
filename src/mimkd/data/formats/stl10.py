"""STL-10, binary version (``stl10_binary/``): 10 classes of 96×96 colour images.

``{train,test}_X.bin`` hold uint8 images as N×3×96×96 stored column-major within each channel (MATLAB order),
so they are read as N×3×96×96 and the last two axes are swapped. ``{train,test}_y.bin`` hold one uint8 label
per image, 1..10. The 100,000 unlabelled images are not loaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mimkd.data.dataset import ImageDataset, check_dir, check_file, uint8_from_numpy
from mimkd.data.registry import DatasetSpec, register_dataset
from mimkd.errors import DataError

_DIR = "stl10_binary"
_SIDE = 96
_IMAGE_BYTES = 3 * _SIDE * _SIDE
DEFAULT_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _read(path: Path) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


@register_dataset(
    "stl10",
    num_classes=10,
    mean=(0.4467, 0.4398, 0.4066),
    std=(0.2603, 0.2566, 0.2713),
    image_size=96,
    crop_padding=12,
    flip=True,
    install_hint="Download http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz and extract it.",
    aliases=("stl-10",),
    train_size=5000,
)
def load_stl10(spec: DatasetSpec, root: Path, split: str, image_size: int | None) -> ImageDataset:
    """STL-10 train (5,000) or test (8,000) images; ``root`` is ``stl10_binary/`` or its parent."""
    directory = root / _DIR if (root / _DIR).is_dir() else root
    check_dir(directory, spec.name, spec.install_hint)
    x_path = check_file(directory / f"{split}_X.bin", spec.name, spec.install_hint)
    y_path = check_file(directory / f"{split}_y.bin", spec.name, spec.install_hint)
    x = _read(x_path)
    if x.size == 0 or x.size % _IMAGE_BYTES:
        raise DataError(
            f"{x_path}: {x.size} bytes is not a positive multiple of {_IMAGE_BYTES} (3×96×96 per image); "
            "the file is truncated or not STL-10"
        )
    n = x.size // _IMAGE_BYTES
    y = _read(y_path)
    if y.size != n:
        raise DataError(f"{x_path} holds {n} images but {y_path} holds {y.size} labels")
    if y.min() < 1 or y.max() > 10:
        raise DataError(f"{y_path}: labels must lie in 1..10, found {y.min()}..{y.max()}")
    images = uint8_from_numpy(x.reshape(n, 3, _SIDE, _SIDE).transpose(0, 1, 3, 2))
    labels = torch.from_numpy(y.astype(np.int64) - 1)
    classes = DEFAULT_CLASSES
    names_path = directory / "class_names.txt"
    if names_path.is_file():
        names = [line.strip() for line in names_path.read_text(errors="replace").splitlines() if line.strip()]
        if len(names) != 10:
            raise DataError(f"{names_path}: expected 10 class names, found {len(names)}")
        classes = names
    return ImageDataset(images, labels, classes, spec.mean, spec.std, name=spec.name, split=split)
