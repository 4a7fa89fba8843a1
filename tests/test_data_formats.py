"""On-disk dataset formats.

Files are written in the exact on-disk layouts into tmp_path and read back pixel-exactly; every kind of bad
input is refused with a DataError that names the file.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkd.data import channel_stats, dataset_spec, load_dataset
from mimkd.data.formats import folder as folder_mod
from mimkd.errors import DataError

# ---------------------------------------------------------------------------------------------------- helpers


class Py2Pickler(pickle._Pickler):
    """Writes bytes and str as Python 2's cPickle wrote ``str`` (BINSTRING opcodes), as in the CIFAR files."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        if isinstance(obj, str):
            obj = obj.encode("latin-1")
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    # numpy 1.x (which wrote the originals) names the module numpy.core.multiarray.
    return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


def gradient_plane(seed: int) -> np.ndarray:
    """A 32×32 plane whose value depends asymmetrically on (row, col): a transpose or flip changes it."""
    y, x = np.mgrid[0:32, 0:32]
    return ((y * 7 + x * 3 + seed) % 256).astype(np.uint8)


def cifar_rows(n: int, offset: int) -> np.ndarray:
    rows = np.zeros((n, 3072), dtype=np.uint8)
    for i in range(n):
        rows[i, :1024] = gradient_plane(offset + i).ravel()  # R plane, row-major
        rows[i, 1024:2048] = offset + i  # G plane constant: identifies the image
        rows[i, 2048:] = 255 - (offset + i)
    return rows


def write_cifar100(root: Path, n_train: int = 5, n_test: int = 3, py2: bool = True) -> Path:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    dump = py2_pickle if py2 else (lambda o: pickle.dumps(o, protocol=2))
    for name, n, off in (("train", n_train, 0), ("test", n_test, 100)):
        obj = {
            b"data": cifar_rows(n, off),
            b"fine_labels": [(off + 3 * i) % 100 for i in range(n)],
            b"coarse_labels": [i % 20 for i in range(n)],
            b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            b"batch_label": b"training batch 1 of 1",
        }
        (d / name).write_bytes(dump(obj))
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    (d / "meta").write_bytes(dump(meta))
    return d


def write_cifar10(root: Path) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for b in range(1, 6):
        obj = {b"data": cifar_rows(2, 10 * b), b"labels": [b, (b + 1) % 10], b"batch_label": b"x"}
        (d / f"data_batch_{b}").write_bytes(py2_pickle(obj))
    (d / "test_batch").write_bytes(py2_pickle({b"data": cifar_rows(3, 200), b"labels": [7, 8, 9]}))
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    (d / "batches.meta").write_bytes(py2_pickle({b"label_names": names, b"num_vis": 3072}))
    return d


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}i", *array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def idx_images(n: int) -> np.ndarray:
    y, x = np.mgrid[0:28, 0:28]
    return np.stack([((y * 9 + x + 11 * i) % 256).astype(np.uint8) for i in range(n)])


def write_idx(root: Path, n_train: int = 7, n_test: int = 4, gz: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        for kind, arr in (("images-idx3", idx_images(n)), ("labels-idx1", np.arange(n, dtype=np.uint8) % 10)):
            data = idx_bytes(arr)
            name = f"{stem}-{kind}-ubyte"
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return root


def save_image(path: Path, array: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def pattern(h: int, w: int, seed: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(y * 13 + x * 5 + seed) % 256, (x * 11 + seed) % 256, (y * 17 + seed) % 256], -1).astype(
        np.uint8
    )


# ------------------------------------------------------------------------------------------------------ CIFAR


@pytest.mark.parametrize("py2", [True, False], ids=["python2-pickle", "python3-pickle"])
def test_cifar100_round_trip_pixel_exact(tmp_path, py2):
    d = write_cifar100(tmp_path, py2=py2)
    train = load_dataset("cifar100", root=tmp_path)
    assert train.images.shape == (5, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.classes == [f"fine{i}" for i in range(100)] and train.num_classes == 100
    assert train.labels.tolist() == [0, 3, 6, 9, 12]
    for i in range(5):
        assert torch.equal(train.images[i, 0], torch.from_numpy(gradient_plane(i)))  # orientation kept
        assert (train.images[i, 1] == i).all() and (train.images[i, 2] == 255 - i).all()
    assert train.mean == (0.5071, 0.4867, 0.4408) and train.std == (0.2675, 0.2565, 0.2761)
    test = load_dataset("cifar100", root=d, split="test")  # root = the cifar-100-python directory itself
    assert len(test) == 3 and test.labels.tolist() == [100 % 100, 103 % 100, 106 % 100]
    assert torch.equal(test.images[2, 0], torch.from_numpy(gradient_plane(102)))


def test_cifar_str_keys_accepted(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    (d / "train").write_bytes(pickle.dumps({"data": cifar_rows(2, 0), "fine_labels": [4, 5]}, protocol=4))
    (d / "test").write_bytes(pickle.dumps({"data": cifar_rows(1, 0), "fine_labels": [1]}, protocol=5))
    (d / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    ds = load_dataset("cifar100", root=d)
    assert ds.labels.tolist() == [4, 5] and ds.classes[4] == "c4"
    test = load_dataset("cifar100", root=d, split="test")  # numpy's protocol-5 array pickling
    assert torch.equal(test.images[0, 0], torch.from_numpy(gradient_plane(0)))


def test_cifar10_batches_concatenated_in_order(tmp_path):
    write_cifar10(tmp_path)
    train = load_dataset("cifar10", root=tmp_path)
    assert len(train) == 10 and train.classes[1] == "automobile"
    assert train.labels.tolist() == [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]
    assert train.images[:, 1, 0, 0].tolist() == [10, 11, 20, 21, 30, 31, 40, 41, 50, 51]
    test = load_dataset("cifar10", root=tmp_path / "cifar-10-batches-py", split="val")  # val = test
    assert test.labels.tolist() == [7, 8, 9]


def test_cifar_resized_with_image_size_and_mean_override(tmp_path):
    write_cifar100(tmp_path)
    ds = load_dataset("cifar100", root=tmp_path, image_size=16, mean=0.5, std=[0.25, 0.25, 0.25])
    assert ds.image_shape == (3, 16, 16) and ds.mean == (0.5, 0.5, 0.5) and ds.std == (0.25,) * 3
    assert (ds.images[3, 1] == 3).all()  # a constant plane stays constant


def test_cifar_missing_root_names_expected_path(tmp_path):
    with pytest.raises(DataError, match="cifar-100-python") as e:
        load_dataset("cifar100", root=tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value) and "cifar-100-python.tar.gz" in str(e.value)


def _corrupt_cifar(tmp_path: Path, content: bytes) -> Path:
    d = write_cifar100(tmp_path)
    (d / "train").write_bytes(content)
    return d / "train"


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda good: good[: len(good) // 2], "not a valid CIFAR pickle"),  # truncated
        (lambda good: os.urandom(64), "not a valid CIFAR pickle"),  # not a pickle
        (lambda good: pickle.dumps([1, 2, 3], protocol=2), "expected a pickled dict"),  # something else
        (lambda good: py2_pickle({b"labels": [1]}), "missing key 'data'"),
        (lambda good: py2_pickle({b"data": np.zeros((2, 3000), np.uint8), b"fine_labels": [1, 2]}), "N×3072"),
        (
            lambda good: py2_pickle({b"data": cifar_rows(3, 0), b"fine_labels": [1, 2]}),
            "3 images but 2 labels",
        ),
        (lambda good: py2_pickle({b"data": cifar_rows(1, 0), b"fine_labels": [100]}), r"labels must lie"),
    ],
    ids=["truncated", "not-a-pickle", "a-list", "wrong-keys", "bad-length", "count-mismatch", "label-range"],
)
def test_cifar_bad_files_raise_dataerror_naming_file(tmp_path, make, needle):
    good = py2_pickle({b"data": cifar_rows(4, 0), b"fine_labels": [0, 1, 2, 3]})
    path = _corrupt_cifar(tmp_path, make(good))
    with pytest.raises(DataError, match=needle) as e:
        load_dataset("cifar100", root=tmp_path)
    assert str(path) in str(e.value)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = _corrupt_cifar(tmp_path, pickle.dumps({b"data": _Evil(marker)}, protocol=2))
    with pytest.raises(DataError, match="refused to load .*system") as e:
        load_dataset("cifar100", root=tmp_path)
    assert str(path) in str(e.value)
    assert e.value.__cause__ is None and e.value.__suppress_context__  # no raw unpickling traceback
    assert not marker.exists()


def test_cifar_missing_meta(tmp_path):
    d = write_cifar100(tmp_path)
    (d / "meta").unlink()
    with pytest.raises(DataError, match="meta"):
        load_dataset("cifar100", root=d)


# -------------------------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_idx_round_trip(tmp_path, gz):
    root = write_idx(tmp_path / "fm", gz=gz)
    train = load_dataset("fashion-mnist", root=root)
    assert train.name == "fashion_mnist" and train.images.shape == (7, 1, 28, 28)
    assert torch.equal(train.images[:, 0], torch.from_numpy(idx_images(7)))
    assert train.labels.tolist() == [0, 1, 2, 3, 4, 5, 6] and train.classes[9] == "Ankle boot"
    test = load_dataset("mnist", root=root, split="test")
    assert len(test) == 4 and test.mean == (0.1307,) and test.classes[3] == "3"


def _rewrite_idx(root: Path, name: str, data: bytes, gz: bool = True) -> Path:
    path = root / (name + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def test_idx_truncated_payload(tmp_path):
    root = write_idx(tmp_path, gz=False)
    path = _rewrite_idx(root, "train-images-idx3-ubyte", idx_bytes(idx_images(7))[:-100], gz=False)
    with pytest.raises(DataError, match=r"7×28×28 = 5488 bytes .* holds 5388; the file is truncated") as e:
        load_dataset("mnist", root=root)
    assert str(path) in str(e.value)


def test_idx_wrong_magic(tmp_path):
    root = write_idx(tmp_path)
    path = _rewrite_idx(root, "train-labels-idx1-ubyte", idx_bytes(np.zeros((7, 2), np.uint8)))
    with pytest.raises(DataError, match="magic number 0x00000802, expected 0x00000801") as e:
        load_dataset("mnist", root=root)
    assert str(path) in str(e.value)


def test_idx_corrupt_gzip(tmp_path):
    root = write_idx(tmp_path)
    path = root / "train-images-idx3-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 8] = b"\x00\xff" * 4
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="corrupt gzip") as e:
        load_dataset("mnist", root=root)
    assert str(path) in str(e.value)


def test_idx_gzip_cut_short(tmp_path):
    root = write_idx(tmp_path)
    path = root / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(DataError, match="corrupt gzip"):
        load_dataset("mnist", root=root, split="test")


def test_idx_count_mismatch(tmp_path):
    root = write_idx(tmp_path)
    _rewrite_idx(root, "train-labels-idx1-ubyte", idx_bytes(np.zeros(6, np.uint8)))
    with pytest.raises(DataError, match="holds 7 images but .*train-labels-idx1-ubyte.gz holds 6 labels"):
        load_dataset("mnist", root=root)


def test_idx_missing_file_and_missing_root_explain_install(tmp_path):
    root = write_idx(tmp_path)
    (root / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_dataset("fashion_mnist", root=root, split="test")
    with pytest.raises(DataError, match=r"apt-get install -y dataset-fashion-mnist") as e:
        load_dataset("fashion_mnist", root=tmp_path / "absent")
    assert str(tmp_path / "absent") in str(e.value) and "apt-get update" in str(e.value)
    assert dataset_spec("fashion_mnist").default_root == "/usr/share/datasets/fashion-mnist"


# ----------------------------------------------------------------------------------------------------- folder


def make_tree(root: Path) -> dict:
    arrays = {}
    for split in ("train", "val"):
        for ci, cls in enumerate(["zebra", "apple", "mango"]):  # sorted order: apple, mango, zebra
            for k in range(2):
                arr = pattern(8, 8, seed=40 * ci + 7 * k + (100 if split == "val" else 0))
                ext = [".png", ".PNG", ".bmp"][k % 2 + (ci == 2)]
                path = root / split / cls / f"img{k}{ext}"
                save_image(path, arr, fmt="BMP" if ext == ".bmp" else "PNG")
                arrays[path] = arr
    (root / "train" / "apple" / "notes.txt").write_text("not an image")
    return arrays


def test_folder_round_trip_classes_and_splits(tmp_path):
    arrays = make_tree(tmp_path)
    train = load_dataset("folder", root=tmp_path, image_size=8)
    assert train.classes == ["apple", "mango", "zebra"] and len(train) == 6
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    expected = arrays[tmp_path / "train" / "mango" / "img1.bmp"]
    assert torch.equal(train.images[3], torch.from_numpy(expected).permute(2, 0, 1))
    val = load_dataset("folder", root=tmp_path, split="val", image_size=8)
    assert val.classes == train.classes and len(val) == 6
    assert torch.equal(
        val.images[0], torch.from_numpy(arrays[tmp_path / "val" / "apple" / "img0.png"]).permute(2, 0, 1)
    )
    assert val.mean == train.mean == channel_stats(train.images)[0]  # stats from the training images
    assert (
        load_dataset("folder", root=tmp_path, split="test", image_size=8).split == "test"
    )  # falls back to val/
    given = load_dataset("folder", root=tmp_path, split="val", image_size=8, mean=0.5, std=(0.1, 0.2, 0.3))
    assert given.mean == (0.5, 0.5, 0.5) and given.std == (0.1, 0.2, 0.3)


def test_folder_resize_and_center_crop_and_grey(tmp_path):
    wide = pattern(8, 16, seed=3)
    save_image(tmp_path / "a" / "wide.png", wide)
    save_image(tmp_path / "b" / "photo.JPEG", pattern(40, 30, seed=5), fmt="JPEG")
    ds = load_dataset("folder", root=tmp_path, image_size=8)
    assert ds.image_shape == (3, 8, 8) and ds.labels.tolist() == [0, 1]
    assert torch.equal(ds.images[0], torch.from_numpy(wide[:, 4:12]).permute(2, 0, 1))  # centre crop
    grey = load_dataset("folder", root=tmp_path, image_size=8, channels=1)
    assert grey.image_shape == (1, 8, 8) and len(grey.mean) == 1
    with pytest.raises(DataError, match="only a 'train' split"):
        load_dataset("folder", root=tmp_path, split="val", image_size=8)
    with pytest.raises(DataError, match="image_size"):
        load_dataset("folder", root=tmp_path)


def test_folder_empty_class_and_unreadable_image(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DataError, match="empty class directory .*empty"):
        load_dataset("folder", root=tmp_path, image_size=8)
    (tmp_path / "train" / "empty").rmdir()
    bad = tmp_path / "train" / "apple" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match="cannot read image") as e:
        load_dataset("folder", root=tmp_path, image_size=8)
    assert str(bad) in str(e.value)


def test_folder_val_class_unknown(tmp_path):
    make_tree(tmp_path)
    save_image(tmp_path / "val" / "kiwi" / "x.png", pattern(8, 8, 1))
    with pytest.raises(DataError, match="kiwi"):
        load_dataset("folder", root=tmp_path, split="val", image_size=8)


def test_folder_cache_used_and_invalidated(tmp_path, monkeypatch):
    make_tree(tmp_path / "data")
    cache = tmp_path / "cache"
    first = load_dataset("folder", root=tmp_path / "data", image_size=8, cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 1 and not list(cache.glob("*.tmp*"))

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(folder_mod, "decode_images", no_decode)
    again = load_dataset("folder", root=tmp_path / "data", image_size=8, cache_dir=cache)
    assert torch.equal(first.images, again.images)
    monkeypatch.undo()
    changed = tmp_path / "data" / "train" / "apple" / "img0.png"
    save_image(changed, np.zeros((8, 8, 3), np.uint8))
    fresh = load_dataset("folder", root=tmp_path / "data", image_size=8, cache_dir=cache)
    assert (fresh.images[0] == 0).all() and len(list(cache.glob("*.pt"))) == 2


def test_imagenet_layout(tmp_path):
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            save_image(tmp_path / split / wnid / f"{wnid}_1.JPEG", pattern(20, 24, 9), fmt="JPEG")
    ds = load_dataset("imagenet", root=tmp_path, split="val", image_size=16)
    assert ds.image_shape == (3, 16, 16) and ds.classes == ["n01440764", "n01443537"]
    assert ds.mean == (0.485, 0.456, 0.406)
    assert dataset_spec("imagenet").resized_crop
    with pytest.raises(DataError, match="train"):
        load_dataset("imagenet", root=tmp_path / "val")


# ----------------------------------------------------------------------------------------------- TinyImageNet


def make_tiny(root: Path, n_classes: int = 200) -> list[str]:
    d = root / "tiny-imagenet-200"
    wnids = [f"n{9000 - i:08d}" for i in range(n_classes)]  # written unsorted
    d.mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (d / "words.txt").write_text("".join(f"{w}\tthing {w}, other name\n" for w in wnids))
    for i, w in enumerate(wnids):
        colour = np.full((64, 64, 3), (i % 250, 3, 200), np.uint8)
        save_image(d / "train" / w / "images" / f"{w}_0.JPEG", colour, fmt="JPEG")
        (d / "train" / w / f"{w}_boxes.txt").write_text("x")
    lines = []
    for j, w in enumerate(wnids[:3]):
        save_image(d / "val" / "images" / f"val_{j}.JPEG", np.full((64, 64, 3), 77 * j, np.uint8), fmt="JPEG")
        lines.append(f"val_{j}.JPEG\t{w}\t0\t0\t10\t10")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return wnids


def test_tinyimagenet_layout(tmp_path):
    wnids = make_tiny(tmp_path)
    train = load_dataset("tinyimagenet", root=tmp_path)
    order = sorted(wnids)
    assert len(train) == 200 and train.classes[0] == f"thing {order[0]}"
    k = order.index(wnids[5])
    assert train.labels[k] == k and abs(int(train.images[k, 0].float().mean()) - 5) <= 2
    val = load_dataset("tiny-imagenet", root=tmp_path / "tiny-imagenet-200", split="test", image_size=32)
    assert val.image_shape == (3, 32, 32)
    assert val.labels.tolist() == [order.index(w) for w in wnids[:3]]
    assert abs(float(val.images[2].float().mean()) - 154) <= 2


def test_tinyimagenet_bad_annotation(tmp_path):
    make_tiny(tmp_path)
    ann = tmp_path / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="line 1") as e:
        load_dataset("tinyimagenet", root=tmp_path, split="val")
    assert str(ann) in str(e.value)


# ----------------------------------------------------------------------------------------------------- STL-10


def stl_image(i: int) -> np.ndarray:
    y, x = np.mgrid[0:96, 0:96]
    return np.stack([(y * 2 + i) % 256, (x + i) % 256, (y + 3 * x) % 256]).astype(np.uint8)  # 3×96×96


def write_stl(root: Path, n: int = 3, labels: list[int] | None = None) -> Path:
    d = root / "stl10_binary"
    d.mkdir(parents=True)
    for split in ("train", "test"):
        imgs = np.stack([stl_image(i) for i in range(n)])
        (d / f"{split}_X.bin").write_bytes(imgs.transpose(0, 1, 3, 2).tobytes())  # column-major per image
        (d / f"{split}_y.bin").write_bytes(bytes(labels or [1 + i % 10 for i in range(n)]))
    (d / "class_names.txt").write_text("\n".join(f"cls{i}" for i in range(10)) + "\n")
    return d


def test_stl10_round_trip_transposed(tmp_path):
    write_stl(tmp_path)
    ds = load_dataset("stl10", root=tmp_path)
    assert ds.image_shape == (3, 96, 96) and ds.labels.tolist() == [0, 1, 2] and ds.classes[2] == "cls2"
    for i in range(3):
        assert torch.equal(ds.images[i], torch.from_numpy(stl_image(i)))
    assert not torch.equal(ds.images[0, 0, 0, :], ds.images[0, 0, :, 0])  # first row != first column
    assert load_dataset(
        "stl-10", root=tmp_path / "stl10_binary", split="test", image_size=32
    ).image_shape == (
        3,
        32,
        32,
    )


def test_stl10_bad_files(tmp_path):
    d = write_stl(tmp_path)
    x = d / "train_X.bin"
    x.write_bytes(x.read_bytes()[:-5])
    with pytest.raises(DataError, match="not a positive multiple of 27648") as e:
        load_dataset("stl10", root=tmp_path)
    assert str(x) in str(e.value)
    (d / "test_y.bin").write_bytes(bytes([1, 2]))
    with pytest.raises(DataError, match="3 images but .*test_y.bin holds 2 labels"):
        load_dataset("stl10", root=tmp_path, split="test")
    (d / "test_y.bin").write_bytes(bytes([1, 0, 2]))
    with pytest.raises(DataError, match="1..10"):
        load_dataset("stl10", root=tmp_path, split="test")
    with pytest.raises(DataError, match="stl10_binary.tar.gz"):
        load_dataset("stl10", root=tmp_path / "missing")
