"""The dataset registry: one :class:`DatasetSpec` per dataset name, and :func:`load_dataset`.

A loader is registered with :func:`register_dataset`, which records what the rest of the toolkit needs to know
about the dataset without loading it: its default location (if it has one), number of classes, normalisation,
natural image size and the augmentation that suits it. ``load_dataset`` resolves the name (aliases included),
checks the split and the options, calls the loader, then applies the options every dataset shares
(``image_size`` resizing, ``mean``/``std`` overrides).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from mimkd.data.augment import BatchAugment
from mimkd.data.dataset import ImageDataset, resize_images
from mimkd.errors import DataError, did_you_mean, unknown_name_error

__all__ = [
    "DatasetSpec",
    "register_dataset",
    "dataset_spec",
    "available_datasets",
    "load_dataset",
    "default_augment",
]

Loader = Callable[..., ImageDataset]

_FORMAT_MODULES = ("cifar", "idx", "digits", "folder", "tinyimagenet", "stl10")
_REGISTRY: dict[str, DatasetSpec] = {}
_ALIASES: dict[str, str] = {}
_loaded = False


@dataclass(frozen=True)
class DatasetSpec:
    """What the toolkit knows about a dataset before loading it.

    Attributes:
        name: registry name.
        loader: ``loader(spec, root: Path, split: str, image_size: int | None, **options) -> ImageDataset``.
        num_classes: number of classes, ``None`` when it depends on the files (folder trees).
        mean, std: per-channel normalisation in [0, 1] units; ``None`` when computed from the training images.
        image_size: natural side length of the images, ``None`` when it varies (photographs).
        crop_padding: zero padding of the random crop at the natural size (scaled with the image size); for
            datasets without a natural size any nonzero value means ``image_size // 8``.
        flip: whether a random horizontal flip suits the data (not for digits).
        resized_crop: whether training should use a random resized crop (ImageNet-style) instead of pad+crop.
        default_root: where the data is looked for when no root is given.
        install_hint: how to get the data, quoted in the error when it is missing.
        splits: the split names the loader understands; ``"val"`` and ``"test"`` stand in for each other.
        aliases: other accepted names.
        needs_root: ``False`` for data that ships with a library (the loader then gets ``root=None``).
        channels: image channels (3 for colour, 1 for grey), known without loading.
        train_size: number of training images of the standard split, ``None`` when it varies.
    """

    name: str
    loader: Loader
    num_classes: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    image_size: int | None
    crop_padding: int = 0
    flip: bool = False
    resized_crop: bool = False
    default_root: str | None = None
    install_hint: str = ""
    splits: tuple[str, ...] = ("train", "test")
    aliases: tuple[str, ...] = field(default=())
    needs_root: bool = True
    channels: int = 3
    train_size: int | None = None

    def resolve_split(self, split: str) -> str:
        """The loader's name for ``split`` (``val`` and ``test`` are interchangeable), or a DataError."""
        if split in self.splits:
            return split
        other = {"val": "test", "test": "val", "valid": "val", "validation": "val"}.get(split)
        if other in self.splits:
            return other
        if other == "val" and "test" in self.splits:
            return "test"
        raise DataError(
            f"dataset {self.name!r} has no split {split!r}; valid splits: {', '.join(self.splits)}"
        )

    def augment(
        self, mean: Sequence[float], std: Sequence[float], image_size: int, *, flip: bool | None = None
    ) -> BatchAugment:
        """The default training augmentation for images of side ``image_size``.

        The crop padding is given at the natural size and scaled with the image (CIFAR: 4 px at 32 px, so 8 px
        at 64 px); datasets without a natural size pad by ``image_size // 8``. ``resized_crop`` datasets get a
        random resized crop to ``image_size`` instead.
        """
        flip = self.flip if flip is None else flip
        if self.resized_crop:
            return BatchAugment(mean, std, flip=flip, resized_crop=image_size)
        if self.image_size:
            padding = round(self.crop_padding * image_size / self.image_size)
        else:
            padding = image_size // 8 if self.crop_padding else 0
        return BatchAugment(mean, std, crop_padding=padding, flip=flip)


def register_dataset(
    name: str,
    *,
    num_classes: int | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    image_size: int | None,
    crop_padding: int = 0,
    flip: bool = False,
    resized_crop: bool = False,
    default_root: str | None = None,
    install_hint: str = "",
    splits: Sequence[str] = ("train", "test"),
    aliases: Sequence[str] = (),
    needs_root: bool = True,
    channels: int = 3,
    train_size: int | None = None,
) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader`` under ``name`` (stackable: one loader may serve several names)."""

    def deco(loader: Loader) -> Loader:
        if name in _REGISTRY or name in _ALIASES:
            raise ValueError(f"dataset {name!r} registered twice")
        _REGISTRY[name] = DatasetSpec(
            name=name,
            loader=loader,
            num_classes=num_classes,
            mean=tuple(mean) if mean is not None else None,
            std=tuple(std) if std is not None else None,
            image_size=image_size,
            crop_padding=crop_padding,
            flip=flip,
            resized_crop=resized_crop,
            default_root=default_root,
            install_hint=install_hint,
            splits=tuple(splits),
            aliases=tuple(aliases),
            needs_root=needs_root,
            channels=channels,
            train_size=train_size,
        )
        for alias in aliases:
            _ALIASES[alias] = name
        return loader

    return deco


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        for module in _FORMAT_MODULES:
            importlib.import_module(f"mimkd.data.formats.{module}")
        _loaded = True


def available_datasets() -> list[str]:
    """Names of every registered dataset (aliases not included)."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def dataset_spec(name: str) -> DatasetSpec:
    """The spec registered under ``name`` or one of its aliases; unknown names raise a DataError."""
    _ensure_loaded()
    key = _ALIASES.get(name, name)
    if key not in _REGISTRY:
        raise unknown_name_error("dataset", name, list(_REGISTRY) + list(_ALIASES), DataError)
    return _REGISTRY[key]


def load_dataset(
    name: str,
    root: str | Path | None = None,
    split: str = "train",
    image_size: int | None = None,
    **options: object,
) -> ImageDataset:
    """Load a registered dataset into memory as an :class:`ImageDataset`.

    Args:
        name: a name from :func:`available_datasets` (or an alias such as ``"fashion-mnist"``).
        root: where the data lies; defaults to the dataset's default location, if it has one.
        split: ``"train"`` or ``"test"``/``"val"`` (interchangeable for datasets that have only one of them).
        image_size: resize the images to ``image_size``×``image_size`` (natural size when ``None``; required
            for folder trees).
        **options: dataset-specific options (e.g. ``channels`` or ``cache_dir`` for folder trees) plus, for
            every dataset, ``mean`` and ``std`` to override the normalisation (e.g. CIFAR statistics when
            probing a CIFAR model on STL-10).
    """
    spec = dataset_spec(name)
    split = spec.resolve_split(split)
    if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    mean = options.pop("mean", None)
    std = options.pop("std", None)
    _check_options(spec, options)
    if root is None and spec.needs_root:
        if spec.default_root is None:
            raise DataError(
                f"dataset {spec.name!r} has no default location: pass root=<directory>."
                f"{' ' + spec.install_hint if spec.install_hint else ''}"
            )
        root = spec.default_root
    path = Path(root).expanduser() if root is not None else None
    if _keyword_options(spec) >= {"mean", "std"}:  # lets the loader skip computing statistics it is given
        options.update(mean=mean, std=std)
    ds = spec.loader(spec, path, split, image_size, **options)
    if image_size is not None and ds.image_shape[1:] != (image_size, image_size):
        ds = replace(ds, images=resize_images(ds.images, image_size))
    if mean is not None or std is not None:
        ds = replace(
            ds,
            mean=_channel_tuple("mean", mean, ds) if mean is not None else ds.mean,
            std=_channel_tuple("std", std, ds) if std is not None else ds.std,
        )
    return ds


def default_augment(dataset: ImageDataset, *, flip: bool | None = None) -> BatchAugment:
    """The training augmentation registered for ``dataset.name``, with the dataset's own mean/std."""
    spec = dataset_spec(dataset.name)
    return spec.augment(dataset.mean, dataset.std, dataset.image_shape[1], flip=flip)


def _keyword_options(spec: DatasetSpec) -> set[str]:
    params = inspect.signature(spec.loader).parameters
    return {p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}


def _check_options(spec: DatasetSpec, options: dict[str, object]) -> None:
    accepted = sorted(_keyword_options(spec) - {"mean", "std"})
    for key in options:
        if key not in accepted:
            valid = ", ".join(["mean", "std", *accepted])
            raise DataError(
                f"dataset {spec.name!r} has no option {key!r}.{did_you_mean(key, accepted)} "
                f"Valid options: {valid}"
            )


def _channel_tuple(what: str, value: object, ds: ImageDataset) -> tuple[float, ...]:
    values = (value,) if isinstance(value, int | float) else value
    try:
        out = tuple(float(v) for v in values)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise DataError(f"{what} must be a number or one number per channel, got {value!r}") from None
    channels = ds.image_shape[0]
    if len(out) == 1 and channels > 1:
        out = out * channels
    if len(out) != channels:
        raise DataError(f"{what} needs {channels} values (one per channel), got {len(out)}")
    return out
