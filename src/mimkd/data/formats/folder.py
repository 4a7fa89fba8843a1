"""Class-per-directory image trees (``root/<class>/*.png``), ImageNet's reorganised layout, and the shared
decoding, caching and statistics helpers used by every photograph dataset.

Images are decoded with Pillow (threads; Pillow releases the GIL while decoding), converted to RGB (or L),
resized so the shorter side is ``image_size`` and centre-cropped to a square. Decoding a large tree is slow,
so ``cache_dir`` may keep the decoded tensor, keyed by every file's path, mtime and size plus the image size.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from mimkd.data.dataset import ImageDataset, channel_stats, check_dir
from mimkd.data.registry import DatasetSpec, register_dataset
from mimkd.errors import DataError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp"})
STATS_SAMPLE = 2000  # at most this many training images (evenly spaced) give a folder's mean/std
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def list_images(directory: Path, recursive: bool = True) -> list[Path]:
    """Image files (by extension, case-insensitive) under ``directory``, sorted; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(dirpath) / f
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        ]
        if not recursive:
            break
    return sorted(found)


def scan_class_tree(
    directory: Path, what: str, classes: Sequence[str] | None = None
) -> tuple[list[str], list[Path], list[int]]:
    """Classes (sorted directory names unless given), image files and labels of ``directory/<class>/...``."""
    check_dir(directory, what)
    class_dirs = sorted(d for d in directory.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(
            f"{what}: no class directories in {directory}; expected {directory}/<class_name>/*.png"
        )
    if classes is None:
        classes = [d.name for d in class_dirs]
    index = {c: i for i, c in enumerate(classes)}
    files: list[Path] = []
    labels: list[int] = []
    for d in class_dirs:
        if d.name not in index:
            raise DataError(f"{what}: class directory {d} is not one of the {len(classes)} training classes")
        images = list_images(d)
        if not images:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"{what}: empty class directory {d} (no image files with extension {exts})")
        files += images
        labels += [index[d.name]] * len(images)
    return list(classes), files, labels


def decode_image(path: Path, size: int, channels: int = 3) -> np.ndarray:
    """One image as a size×size(×3) uint8 array: shorter side resized to ``size``, centre crop."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as im:
            if im.format == "JPEG":
                im.draft(mode, (size, size))  # let libjpeg decode at a reduced scale (>= size)
            im = im.convert(mode)
            w, h = im.size
            if (w, h) != (size, size):
                s = size / min(w, h)
                nw, nh = max(size, round(w * s)), max(size, round(h * s))
                if (nw, nh) != (w, h):
                    im = im.resize((nw, nh), Image.BILINEAR)
                left, top = (nw - size) // 2, (nh - size) // 2
                im = im.crop((left, top, left + size, top + size))
            return np.asarray(im, dtype=np.uint8)
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None


def decode_images(
    files: Sequence[Path], size: int, channels: int = 3, workers: int | None = None
) -> torch.Tensor:
    """Decode ``files`` into one uint8 N×C×size×size tensor (threads; errors name the file)."""
    out = torch.empty((len(files), channels, size, size), dtype=torch.uint8)
    view = out.numpy()

    def work(i: int) -> None:
        arr = decode_image(files[i], size, channels)
        view[i] = arr[None] if channels == 1 else arr.transpose(2, 0, 1)

    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(files) < 64:
        for i in range(len(files)):
            work(i)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, range(len(files)), chunksize=64))
    return out


def cached_decode(
    cache_dir: str | Path | None,
    tag: str,
    files: Sequence[Path],
    build: Callable[[], torch.Tensor],
    size: int,
    channels: int,
) -> torch.Tensor:
    """``build()``, or the tensor cached under ``cache_dir`` for exactly these files (path, mtime, size)."""
    if cache_dir is None:
        return build()
    digest = hashlib.sha256(f"{tag}|{size}|{channels}|{len(files)}".encode())
    for f in files:
        st = f.stat()
        digest.update(f"\n{f.resolve()}|{st.st_mtime_ns}|{st.st_size}".encode())
    cache_dir = Path(cache_dir).expanduser()
    path = cache_dir / f"{tag}-{size}px-{digest.hexdigest()[:24]}.pt"
    if path.is_file():
        try:
            images = torch.load(path, weights_only=True)
            if isinstance(images, torch.Tensor) and images.shape == (len(files), channels, size, size):
                return images
        except Exception:  # a damaged cache file is rebuilt below
            pass
    images = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        torch.save(images, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return images


def stats_sample(n: int) -> list[int]:
    """Evenly spaced indices (at most :data:`STATS_SAMPLE`) of the training images used for mean/std."""
    step = max(1, -(-n // STATS_SAMPLE))
    return list(range(0, n, step))


def _split_dir(root: Path, split: str, what: str) -> Path | None:
    """The directory of ``split`` in a ``root/{train,val,test}`` layout, or None for a flat tree."""
    if not (root / "train").is_dir():
        return None
    if split == "train":
        return root / "train"
    for name in (split, "val" if split == "test" else "test"):
        if (root / name).is_dir():
            return root / name
    raise DataError(
        f"{what}: found {root / 'train'} but no {root / 'val'} or {root / 'test'} for split {split!r}"
    )


def load_tree(
    spec: DatasetSpec,
    root: Path,
    split: str,
    image_size: int,
    channels: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    cache_dir: str | Path | None,
    workers: int | None,
) -> ImageDataset:
    """Load a class tree (flat, or with train/val[/test] subdirectories) at ``image_size``."""
    what = spec.name
    check_dir(root, what, spec.install_hint)
    train_dir = _split_dir(root, "train", what) or root
    split_dir = _split_dir(root, split, what)
    if split_dir is None and split != "train":
        raise DataError(
            f"{what}: {root} is a single class tree without train/ and val/ (or test/) subdirectories, so it "
            f"has only a 'train' split; split it into {root}/train/<class>/ and {root}/val/<class>/, or take "
            "a held-out part with mimkd.data.stratified_subset"
        )
    split_dir = split_dir or root
    classes, train_files, train_labels = scan_class_tree(train_dir, f"{what} ({train_dir})")
    if split_dir == train_dir:
        files, labels = train_files, train_labels
    else:
        _, files, labels = scan_class_tree(split_dir, f"{what} ({split_dir})", classes)

    def decode(fs: Sequence[Path]) -> torch.Tensor:
        return decode_images(fs, image_size, channels, workers)

    images = cached_decode(
        cache_dir, f"{spec.name}-{split}", files, lambda: decode(files), image_size, channels
    )
    if mean is None or std is None:
        sample = stats_sample(len(train_files))
        if split_dir == train_dir:
            stat_images = images[sample]
        else:
            stat_images = decode([train_files[i] for i in sample])
        mean, std = channel_stats(stat_images)
    return ImageDataset(
        images, torch.tensor(labels, dtype=torch.int64), classes, mean, std, name=spec.name, split=split
    )


@register_dataset(
    "folder",
    num_classes=None,
    mean=None,
    std=None,
    image_size=None,
    crop_padding=1,  # => image_size // 8 (see DatasetSpec.augment)
    flip=True,
    splits=("train", "val", "test"),
)
def load_folder(
    spec: DatasetSpec,
    root: Path,
    split: str,
    image_size: int | None,
    *,
    channels: int = 3,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
    mean: object = None,
    std: object = None,
) -> ImageDataset:
    """A tree ``root/<class>/*.{png,jpg,jpeg,bmp,webp}``, or ``root/train/<class>/...`` + ``root/val/...``.

    Classes are the sorted directory names (of ``train/`` when split). ``image_size`` is required. Mean/std
    are computed from (up to 2,000 evenly spaced) training images unless passed as options.
    ``channels=1`` decodes greyscale.
    """
    if image_size is None:
        raise DataError("folder datasets need image_size (images are resized to image_size × image_size)")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels!r}")
    if mean is not None and std is not None:  # load_dataset applies the given values; skip computing them
        given = (0.0,) * channels, (1.0,) * channels
        return load_tree(spec, root, split, image_size, channels, *given, cache_dir, workers)
    return load_tree(spec, root, split, image_size, channels, None, None, cache_dir, workers)


@register_dataset(
    "imagenet",
    num_classes=None,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    image_size=None,
    flip=True,
    resized_crop=True,
    splits=("train", "val"),
    train_size=1281167,
    install_hint="Expected root/train/<wnid>/*.JPEG and root/val/<wnid>/*.JPEG (the usual layout)",
)
def load_imagenet(
    spec: DatasetSpec,
    root: Path,
    split: str,
    image_size: int | None,
    *,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
) -> ImageDataset:
    """ImageNet in the reorganised layout ``root/{train,val}/<wnid>/*.JPEG``, resized to ``image_size`` (64).

    The whole split is decoded into one in-memory tensor, which only suits down-sampled ImageNet (64 px:
    1.28M × 12 KB ≈ 16 GB) or subsets; full-resolution ImageNet does not fit in memory as a tensor and needs a
    streaming loader, which is out of scope here.
    """
    if not (root / "train").is_dir():
        raise DataError(f"imagenet: expected {root / 'train'} (and {root / 'val'}). {spec.install_hint}")
    return load_tree(spec, root, split, image_size or 64, 3, spec.mean, spec.std, cache_dir, workers)
