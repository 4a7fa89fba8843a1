"""Tiny ImageNet (``tiny-imagenet-200/``): 200 classes of 64×64 images, 500 train and 50 val images each.

Layout: ``wnids.txt`` (one wnid a line), optional ``words.txt`` (``wnid<TAB>names``), training images in
``train/<wnid>/images/*.JPEG``, validation images in ``val/images/*.JPEG`` labelled by
``val/val_annotations.txt`` (``file<TAB>wnid<TAB>box...``). The test images carry no labels, so ``test`` means
``val``. Classes are the wnids in sorted order (as ``ImageFolder`` orders ``train/``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mimkd.data.dataset import ImageDataset, check_dir, check_file
from mimkd.data.formats.folder import cached_decode, decode_images, list_images
from mimkd.data.registry import DatasetSpec, register_dataset
from mimkd.errors import DataError

_DIR = "tiny-imagenet-200"
_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def _read_text(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


def _class_names(directory: Path, wnids: list[str]) -> list[str]:
    words = directory / "words.txt"
    if not words.is_file():
        return wnids
    names: dict[str, str] = {}
    for line in _read_text(words):
        wnid, _, text = line.partition("\t")
        if text:
            names[wnid.strip()] = text.split(",")[0].strip()
    return [names.get(w, w) for w in wnids]


@register_dataset(
    "tinyimagenet",
    num_classes=200,
    mean=(0.4802, 0.4481, 0.3975),
    std=(0.2302, 0.2265, 0.2262),
    image_size=64,
    crop_padding=8,
    flip=True,
    splits=("train", "val"),
    install_hint=f"Download {_URL} and extract it.",
    aliases=("tiny-imagenet", "tiny_imagenet"),
    train_size=100000,
)
def load_tinyimagenet(
    spec: DatasetSpec,
    root: Path,
    split: str,
    image_size: int | None,
    *,
    cache_dir: str | Path | None = None,
    workers: int | None = None,
) -> ImageDataset:
    """Tiny ImageNet at 64×64 (or ``image_size``); ``root`` is ``tiny-imagenet-200/`` or its parent."""
    directory = root / _DIR if (root / _DIR).is_dir() else root
    if not (directory / "wnids.txt").is_file():
        check_dir(root, spec.name, spec.install_hint)
        raise DataError(
            f"{spec.name}: expected {root / _DIR / 'wnids.txt'} (or root pointing at {_DIR}/ itself). "
            f"{spec.install_hint}"
        )
    wnids = sorted({w.strip() for w in _read_text(directory / "wnids.txt") if w.strip()})
    if len(wnids) != spec.num_classes:
        raise DataError(f"{directory / 'wnids.txt'}: expected {spec.num_classes} wnids, found {len(wnids)}")
    index = {w: i for i, w in enumerate(wnids)}
    files: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for wnid in wnids:
            class_dir = check_dir(directory / "train" / wnid / "images", spec.name)
            images = list_images(class_dir)
            if not images:
                raise DataError(f"{spec.name}: empty class directory {class_dir}")
            files += images
            labels += [index[wnid]] * len(images)
    else:
        ann = check_file(directory / "val" / "val_annotations.txt", spec.name)
        for lineno, line in enumerate(_read_text(ann), 1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) < 2 or fields[1].strip() not in index:
                raise DataError(f"{ann}, line {lineno}: expected 'file<TAB>wnid<TAB>...' with a known wnid")
            files.append(directory / "val" / "images" / fields[0].strip())
            labels.append(index[fields[1].strip()])
        if not files:
            raise DataError(f"{ann} lists no images")
        for f in files:
            if not f.is_file():
                raise DataError(f"{spec.name}: {ann} lists {f.name}, but {f} does not exist")
    size = image_size or spec.image_size
    images = cached_decode(
        cache_dir, f"{spec.name}-{split}", files, lambda: decode_images(files, size, 3, workers), size, 3
    )
    return ImageDataset(
        images,
        torch.tensor(labels, dtype=torch.int64),
        _class_names(directory, wnids),
        spec.mean,
        spec.std,
        name=spec.name,
        split=split,
    )
