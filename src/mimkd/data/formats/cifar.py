"""CIFAR-10 and CIFAR-100, "python version" (pickled dicts, as distributed by the University of Toronto).

The files are Python-2 pickles, so their dict keys load as bytes (``b'data'``). They are read with a
restricted unpickler that can only rebuild numpy arrays and plain containers: a file that asks for anything
else (a malicious pickle calling ``os.system``, a pickled object of another library) is refused with a
DataError.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimkd.data.dataset import ImageDataset, check_file, uint8_from_numpy
from mimkd.data.registry import DatasetSpec, register_dataset
from mimkd.errors import DataError

_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own array-rebuild function
_SCALAR = np.int64(0).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[
    0
]  # how numpy pickles arrays with protocol 5 (Python 3.8+ default)

# (module, name) -> object: everything the CIFAR pickles (and numpy arrays pickled by numpy 1.x / 2.x with
# protocols 2-5) need. Python-2 module names appear as written in the file (find_class sees them unmapped).
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes in protocol 2
}
for _mod in ("builtins", "__builtin__"):
    for _name, _obj in (("set", set), ("frozenset", frozenset), ("bytearray", bytearray), ("slice", slice)):
        _ALLOWED[(_mod, _name)] = _obj

_LAYOUTS = {
    "cifar10": {
        "dir": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels": "labels",
        "names": "label_names",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    },
    "cifar100": {
        "dir": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels": "fine_labels",
        "names": "fine_label_names",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    },
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that only rebuilds numpy arrays, numpy scalars and builtin containers."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name} (only numpy arrays and plain containers are allowed)"
            ) from None


def load_pickle(path: Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (bytes keys kept); any failure is a DataError."""
    try:
        with open(path, "rb") as f:
            return RestrictedUnpickler(f, encoding="bytes").load()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # truncated, not a pickle, forbidden global, ...
        raise DataError(
            f"{path} is not a valid CIFAR pickle ({type(exc).__name__}: {exc}); expected a Python pickle of "
            "a dict with numpy image data. Re-download or re-extract the dataset."
        ) from None


def _get(d: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    found = ", ".join(repr(k) for k in list(d)[:8])
    raise DataError(f"{path}: missing key {key!r} (found keys: {found})")


def _load_dict(path: Path, what: str) -> dict:
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict ({what}), found {type(obj).__name__}")
    return obj


def _names(values: Any, path: Path, key: str) -> list[str]:
    if not isinstance(values, list | tuple) or not values:
        raise DataError(f"{path}: {key!r} must be a non-empty list of class names")
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values]


def read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N×3×32×32 uint8) and labels (int64) of one CIFAR pickle, checked."""
    d = _load_dict(path, "a CIFAR batch")
    data = _get(d, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype.kind not in "ui":
        raise DataError(f"{path}: 'data' must be an integer numpy array, found {type(data).__name__}")
    if data.dtype != np.uint8:
        if data.size and (data.min() < 0 or data.max() > 255):
            raise DataError(f"{path}: 'data' values must lie in 0..255")
        data = data.astype(np.uint8)
    n = data.shape[0] if data.ndim else 0
    if data.ndim not in (2, 4) or data.size != n * 3072:
        raise DataError(
            f"{path}: 'data' has shape {data.shape}; expected N×3072 (3 colour planes of 32×32 per row)"
        )
    labels = _get(d, label_key, path)
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path}: {label_key!r} must be a list of integers") from None
    if labels.ndim != 1 or len(labels) != n:
        raise DataError(f"{path}: {n} images but {labels.size} labels in {label_key!r}")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path}: labels must lie in [0, {num_classes - 1}], found [{labels.min()}, {labels.max()}]"
        )
    images = uint8_from_numpy(data.reshape(n, 3, 32, 32))
    return images, torch.from_numpy(labels.copy())


def _resolve(root: Path, layout: dict, spec: DatasetSpec) -> Path:
    if (root / layout["meta"]).is_file() or root.name == layout["dir"]:
        return root
    if (root / layout["dir"]).is_dir():
        return root / layout["dir"]
    state = "does not exist" if not root.exists() else "does not hold it"
    raise DataError(
        f"{spec.name}: expected the CIFAR python version at {root / layout['dir']} (or root pointing at that "
        f"directory, holding {', '.join(layout['train'] + layout['test'] + [layout['meta']])}), but {root} "
        f"{state}. Download {layout['url']} and extract it there."
    )


_CIFAR_AUG = {"crop_padding": 4, "flip": True, "image_size": 32, "train_size": 50000}


@register_dataset(
    "cifar10",
    num_classes=10,
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    install_hint="Get it from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz.",
    **_CIFAR_AUG,
)
@register_dataset(
    "cifar100",
    num_classes=100,
    mean=(0.5071, 0.4867, 0.4408),
    std=(0.2675, 0.2565, 0.2761),
    install_hint="Get it from https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz.",
    **_CIFAR_AUG,
)
def load_cifar(spec: DatasetSpec, root: Path, split: str, image_size: int | None) -> ImageDataset:
    """CIFAR-10 (``cifar-10-batches-py/``) or CIFAR-100 (``cifar-100-python/``, fine labels).

    ``root`` is the extracted directory or its parent. Splits: ``train`` (50,000) and ``test`` (10,000).
    """
    layout = _LAYOUTS[spec.name]
    directory = _resolve(root, layout, spec)
    meta_path = check_file(directory / layout["meta"], spec.name, "The CIFAR directory is incomplete.")
    meta = _load_dict(meta_path, "class names")
    classes = _names(_get(meta, layout["names"], meta_path), meta_path, layout["names"])
    if len(classes) != spec.num_classes:
        raise DataError(f"{meta_path}: expected {spec.num_classes} class names, found {len(classes)}")
    parts = []
    for fname in layout[split]:
        path = check_file(directory / fname, spec.name, "The CIFAR directory is incomplete.")
        parts.append(read_cifar_batch(path, layout["labels"], len(classes)))
    images = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    labels = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
    return ImageDataset(images, labels, classes, spec.mean, spec.std, name=spec.name, split=split)
