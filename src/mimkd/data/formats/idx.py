"""MNIST and Fashion-MNIST in the idx format (``train-images-idx3-ubyte[.gz]`` and friends).

An idx file is a big-endian header (two zero bytes, a type code, the number of dimensions, then one int32 per
dimension) followed by the raw values. Only unsigned-byte files are read (type code 0x08): magic 0x00000803
for the N×28×28 images and 0x00000801 for the N labels. The header, the payload length and the gzip stream
(CRC included) are all checked.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from mimkd.data.dataset import ImageDataset, check_dir, uint8_from_numpy
from mimkd.data.registry import DatasetSpec, register_dataset
from mimkd.errors import DataError

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_PREFIX = {"train": "train", "test": "t10k"}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte idx file (gzipped or plain) with ``ndim`` dimensions, checking everything."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path} is a corrupt gzip file ({exc}); re-download it") from None
    elif path.suffix == ".gz":
        raise DataError(f"{path} is named .gz but is not a gzip file")
    expected_magic = 0x0800 | ndim
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: {len(raw)} bytes, too short for an idx header with {ndim} dimension(s)")
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise DataError(
            f"{path}: idx magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(unsigned bytes, {ndim} dimension(s)); is this the right file?"
        )
    dims = struct.unpack(f">{ndim}i", raw[4 : 4 + 4 * ndim])
    header = 4 + 4 * ndim
    expected = int(np.prod(dims, dtype=np.int64))
    found = len(raw) - header
    if any(d < 0 for d in dims) or found != expected:
        raise DataError(
            f"{path}: the header gives dimensions {'×'.join(map(str, dims))} = {expected} bytes of data, but "
            f"the file holds {found}; the file is {'truncated' if found < expected else 'too long'}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def find_idx_file(root: Path, stem: str, kind: str) -> Path:
    """The first existing variant of ``{stem}-{kind}``: ``-idx3-ubyte`` / ``.idx3-ubyte``, gzipped or not."""
    dims = "idx3" if kind == "images" else "idx1"
    names = [f"{stem}-{kind}-{dims}-ubyte", f"{stem}-{kind}.{dims}-ubyte"]
    candidates = [root / (n + ext) for n in names for ext in (".gz", "")]
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(f"missing file: expected {candidates[0]} (or {candidates[1].name}) in {root}")


@register_dataset(
    "fashion_mnist",
    num_classes=10,
    mean=(0.2860,),
    std=(0.3530,),
    image_size=28,
    crop_padding=2,
    flip=True,
    channels=1,
    train_size=60000,
    default_root=FASHION_MNIST_ROOT,
    install_hint=(
        "Install it with `apt-get update && apt-get install -y dataset-fashion-mnist` (files go to "
        f"{FASHION_MNIST_ROOT}), or pass root=<directory with train-images-idx3-ubyte.gz ...>."
    ),
    aliases=("fashion-mnist", "fashionmnist"),
)
@register_dataset(
    "mnist",
    num_classes=10,
    mean=(0.1307,),
    std=(0.3081,),
    image_size=28,
    crop_padding=2,
    flip=False,
    channels=1,
    train_size=60000,
    install_hint="Get the four idx files from http://yann.lecun.com/exdb/mnist/ and pass root=<directory>.",
)
def load_idx(spec: DatasetSpec, root: Path, split: str, image_size: int | None) -> ImageDataset:
    """MNIST / Fashion-MNIST from a directory of idx files: ``train`` (60,000) and ``test`` (10,000)."""
    check_dir(root, spec.name, spec.install_hint)
    stem = _PREFIX[split]
    try:
        image_path = find_idx_file(root, stem, "images")
        label_path = find_idx_file(root, stem, "labels")
    except DataError as exc:
        raise DataError(f"{spec.name}: {exc}. {spec.install_hint}") from None
    images = read_idx(image_path, 3)
    labels = read_idx(label_path, 1)
    if len(images) != len(labels):
        raise DataError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels"
        )
    if len(labels) and labels.max() >= spec.num_classes:
        raise DataError(f"{label_path}: labels must lie in [0, {spec.num_classes - 1}], found {labels.max()}")
    classes = FASHION_CLASSES if spec.name == "fashion_mnist" else [str(i) for i in range(10)]
    return ImageDataset(
        uint8_from_numpy(images[:, None]),
        torch.from_numpy(labels.astype(np.int64)),
        classes,
        spec.mean,
        spec.std,
        name=spec.name,
        split=split,
    )
