"""The dataset type, the registry, stratified subsets, batch augmentation and the reproducible batch iterator,
plus the real installed Fashion-MNIST and scikit-learn digits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mimkd.data import (
    BatchAugment,
    BatchIterator,
    ImageDataset,
    available_datasets,
    dataset_spec,
    default_augment,
    eval_batches,
    load_dataset,
    mix_seed,
    normalize,
    random_crop_flip,
    random_resized_crop,
    stratified_subset,
)
from mimkd.data.augment import sample_resized_crop_boxes
from mimkd.errors import DataError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def toy(n: int = 50, c: int = 3, size: int = 8, classes: int = 5) -> ImageDataset:
    g = torch.Generator().manual_seed(123)
    images = torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % classes
    return ImageDataset(
        images, labels, [f"c{i}" for i in range(classes)], (0.5,) * c, (0.25,) * c, name="toy"
    )


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ dataset, registry


def test_image_dataset_validates():
    ok = toy()
    assert len(ok) == 50 and ok.num_classes == 5 and ok.image_shape == (3, 8, 8)
    imgs, labels = ok.images, ok.labels
    cases = [
        (dict(images=imgs.float()), "uint8"),
        (dict(images=imgs[:, 0]), "N×C×H×W"),
        (dict(labels=labels.int()), "int64"),
        (dict(labels=labels[:-1]), "50 images but 49 labels"),
        (dict(labels=labels + 1), r"labels must lie in \[0, 4\]"),
        (dict(mean=(0.5,)), "one value per channel"),
        (dict(std=(0.2, 0.0, 0.2)), "std must be positive"),
    ]
    for change, needle in cases:
        args = dict(images=imgs, labels=labels, classes=ok.classes, mean=ok.mean, std=ok.std)
        args.update(change)
        with pytest.raises(DataError, match=needle):
            ImageDataset(**args)
    nc = ImageDataset(imgs.transpose(2, 3), labels, ok.classes, ok.mean, ok.std)
    assert nc.images.is_contiguous()


def test_subset_and_to():
    ds = toy()
    sub = ds.subset([4, 0, 7])
    assert torch.equal(sub.images, ds.images[[4, 0, 7]]) and sub.labels.tolist() == [4, 0, 2]
    assert sub.classes == ds.classes and sub.mean == ds.mean
    assert ds.to("cpu") is ds
    with pytest.raises(DataError, match="out of range"):
        ds.subset([50])


def test_registry_names_aliases_and_errors():
    names = available_datasets()
    for n in (
        "cifar10",
        "cifar100",
        "fashion_mnist",
        "mnist",
        "digits",
        "folder",
        "imagenet",
        "tinyimagenet",
    ):
        assert n in names
    assert "stl10" in names and "fashion-mnist" not in names
    assert dataset_spec("fashion-mnist").name == "fashion_mnist"
    with pytest.raises(DataError, match="unknown dataset 'cifar1000'.*Did you mean: cifar100"):
        load_dataset("cifar1000")
    with pytest.raises(DataError, match="no split 'holdout'"):
        load_dataset("digits", split="holdout")
    with pytest.raises(DataError, match="no option 'chanels'.*Did you mean: channels"):
        load_dataset("folder", root=".", image_size=8, chanels=1)
    with pytest.raises(DataError, match="has no default location"):
        load_dataset("cifar100")


def test_augmentation_defaults_are_repdistillers():
    c = dataset_spec("cifar100")
    assert (c.crop_padding, c.flip, c.image_size, c.num_classes) == (4, True, 32, 100)
    assert c.augment(c.mean, c.std, 64).crop_padding == 8  # padding scales with the image
    assert dataset_spec("fashion_mnist").augment((0.3,), (0.3,), 28).crop_padding == 2
    assert not dataset_spec("mnist").flip and not dataset_spec("digits").flip
    assert dataset_spec("imagenet").augment((0.5,) * 3, (0.2,) * 3, 64).resized_crop == 64
    aug = default_augment(toy_named("cifar10"))
    assert aug.crop_padding == 4 and aug.flip and aug.mean == (0.5,) * 3


def toy_named(name: str) -> ImageDataset:
    ds = toy(size=32)
    return ImageDataset(ds.images, ds.labels, ds.classes, ds.mean, ds.std, name=name)


# ------------------------------------------------------------------------------------------------- subsets


def test_stratified_subset_counts_sorted_and_seeded():
    labels = torch.tensor([0] * 10 + [1] * 25 + [2] * 5)[torch.randperm(40, generator=gen(0))]
    idx = stratified_subset(labels, 0.3, seed=1)
    assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == len(idx)
    assert torch.bincount(labels[idx]).tolist() == [3, 8, 2]  # round(3.0), round(7.5) up, round(1.5) up
    assert torch.equal(idx, stratified_subset(labels, 0.3, seed=1))
    assert not torch.equal(idx, stratified_subset(labels, 0.3, seed=2))
    assert torch.equal(stratified_subset(labels, 1.0, seed=5), torch.arange(40))
    with pytest.raises(DataError, match=r"class 2 \('bird'\) has 5 sample"):
        stratified_subset(labels, 0.05, seed=0, classes=["a", "b", "bird"])
    for bad in (0, 1.5, -0.1):
        with pytest.raises(DataError, match=r"\(0, 1\]"):
            stratified_subset(labels, bad)


# ----------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(
    not FASHION.is_dir(), reason="Fashion-MNIST not installed at /usr/share/datasets/fashion-mnist"
)
def test_installed_fashion_mnist():
    train = load_dataset("fashion_mnist")
    test = load_dataset("fashion_mnist", split="test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.image_shape == test.image_shape == (1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    idx = stratified_subset(train.labels, 0.1, seed=0)
    assert torch.bincount(train.labels[idx]).tolist() == [600] * 10
    mean, std = (train.images.float() / 255).mean().item(), (train.images.float() / 255).std().item()
    assert abs(mean - 0.2860) < 1e-3 and abs(std - 0.3530) < 1e-3  # the registered statistics are right


def test_digits():
    train = load_dataset("digits")
    test = load_dataset("digits", split="test")
    assert len(train) + len(test) == 1797 and abs(len(test) - 0.2 * 1797) < 10
    assert train.image_shape == (1, 8, 8) and int(train.images.max()) == 255
    probe = load_dataset("digits", split="test", image_size=28, mean=0.286, std=0.353)
    assert probe.image_shape == (1, 28, 28) and probe.mean == (0.286,)
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified
    again = load_dataset("digits", split="test")
    assert torch.equal(test.images, again.images)  # fixed split


# ------------------------------------------------------------------------------------------------ augment


def test_augment_shape_dtype_and_constant_normalisation():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
    x = torch.full((6, 3, 10, 10), 128, dtype=torch.uint8)
    out = BatchAugment(mean, std, crop_padding=0, flip=True)(x, gen(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    for c in range(3):
        assert torch.allclose(out[:, c], torch.tensor((128 / 255 - mean[c]) / std[c]), atol=1e-6)
    assert torch.allclose(normalize(x, mean, std), out, atol=1e-6)
    y = x.float()
    normalize(y, mean, std)
    assert (y == 128).all()  # the caller's tensor is untouched


def windows(p: int) -> list[tuple[int, int]]:
    return [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)]


def test_random_crop_shifts_by_at_most_padding_and_fills_zeros():
    p, h, w = 3, 9, 11
    x = (torch.arange(1, 1 + 4 * 2 * h * w, dtype=torch.float32)).view(4, 2, h, w).repeat(16, 1, 1, 1)
    out = random_crop_flip(x, p, flip=False, generator=gen(1))
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    seen = set()
    for i in range(len(x)):
        match = [o for o in windows(p) if torch.equal(out[i], padded[i, :, o[0] : o[0] + h, o[1] : o[1] + w])]
        assert len(match) == 1, "output is not a window of the zero-padded image"
        seen.add(match[0])
    assert {o[0] for o in seen} == {o[1] for o in seen} == set(range(2 * p + 1))  # every shift in [-p, p]
    # BatchAugment draws the same crops from the same seed
    aug = BatchAugment((0.0, 0.0), (1.0, 1.0), crop_padding=p)(x, gen(1))
    assert torch.allclose(aug * 255, out, rtol=1e-6)
    # explicit offset (0, 0): content moved down-right by p, zeros above and left
    o = random_crop_flip(x[:1], p, False, offsets=torch.tensor([[0, 0]]))
    assert (o[..., :p, :] == 0).all() and (o[..., :, :p] == 0).all()
    assert torch.equal(o[..., p:, p:], x[:1, :, : h - p, : w - p])


def test_flip_flips_and_is_half_the_time():
    x = torch.randint(0, 256, (2000, 1, 4, 5), dtype=torch.uint8, generator=gen(2))
    out = random_crop_flip(x, 0, flip=True, generator=gen(3))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert (flipped | kept).all() and 900 < int(flipped.sum()) < 1100
    both = random_crop_flip(
        x[:2], 1, True, offsets=torch.tensor([[1, 1], [1, 1]]), flips=torch.tensor([True, False])
    )
    assert torch.equal(both[0], x[0].flip(-1)) and torch.equal(both[1], x[1])


def test_augment_seeded():
    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8, generator=gen(4))
    aug = BatchAugment((0.5,) * 3, (0.25,) * 3, crop_padding=2, flip=True)
    assert torch.equal(aug(x, gen(7)), aug(x, gen(7)))
    assert not torch.equal(aug(x, gen(7)), aug(x, gen(8)))
    params = aug.sample(32, (16, 16), gen(7))
    assert torch.equal(aug.apply(x[8:20], params.take(8, 20)), aug(x, gen(7))[8:20])


def test_random_resized_crop():
    x = torch.randint(0, 256, (64, 3, 20, 20), dtype=torch.uint8, generator=gen(5))
    ident = random_resized_crop(x, 20, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=gen(0))
    assert ident.dtype == torch.uint8 and torch.equal(ident, x)
    out = random_resized_crop(x.float(), 12, generator=gen(1))
    assert out.shape == (64, 3, 12, 12) and out.dtype == torch.float32
    boxes = sample_resized_crop_boxes(1000, 30, 40, (0.2, 0.6), (0.5, 2.0), gen(2))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 30).all() and (left + w <= 40).all()
    frac = h * w / 1200
    assert frac.min() > 0.15 and frac.max() < 0.7 and len(set(top.tolist())) > 5
    aug = BatchAugment((0.5,) * 3, (0.2,) * 3, flip=True, resized_crop=8)
    assert aug(x, gen(1)).shape == (64, 3, 8, 8)


# ------------------------------------------------------------------------------------------- BatchIterator


def collect(it, epoch, start=0):
    return list(it.epoch(epoch, start_step=start))


def test_epoch_visits_every_index_once():
    ds = toy(50)
    it = BatchIterator(ds, 8, drop_last=False, seed=3)
    batches = collect(it, 0)
    assert len(it) == len(batches) == 7 and len(batches[-1].index) == 2
    seen = torch.cat([b.index for b in batches])
    assert sorted(seen.tolist()) == list(range(50))
    for b in batches:
        assert torch.equal(b.labels, ds.labels[b.index])
        assert torch.allclose(b.images, normalize(ds.images[b.index], ds.mean, ds.std))
    dropped = BatchIterator(ds, 8, seed=3)
    assert len(dropped) == 6 and all(len(b.index) == 8 for b in collect(dropped, 0))


def test_epochs_differ_and_shuffle_off():
    ds = toy(50)
    it = BatchIterator(ds, 10, seed=0)
    assert not torch.equal(collect(it, 0)[0].index, collect(it, 1)[0].index)
    plain = BatchIterator(ds, 10, shuffle=False)
    assert torch.equal(torch.cat([b.index for b in collect(plain, 4)]), torch.arange(50))
    assert not torch.equal(collect(it, 0)[0].index, collect(BatchIterator(ds, 10, seed=1), 0)[0].index)


def test_resume_reproduces_batches_exactly():
    ds = toy(60)
    aug = BatchAugment(ds.mean, ds.std, crop_padding=2, flip=True)
    full = collect(BatchIterator(ds, 8, seed=11, augment=aug), 5)
    resumed = collect(BatchIterator(ds, 8, seed=11, augment=aug), 5, start=3)  # a fresh iterator: no state
    assert len(resumed) == len(full) - 3
    for a, b in zip(full[3:], resumed):
        assert (
            torch.equal(a.images, b.images)
            and torch.equal(a.index, b.index)
            and torch.equal(a.labels, b.labels)
        )
    with pytest.raises(DataError, match="start_step"):
        collect(BatchIterator(ds, 8), 0, start=99)


@pytest.mark.parametrize("drop_last", [True, False])
def test_two_ranks_union_equals_one_process_global_batch(drop_last):
    ds = toy(45)
    aug = BatchAugment(ds.mean, ds.std, crop_padding=2, flip=True)
    kw = dict(seed=9, augment=aug, drop_last=drop_last)
    single = collect(BatchIterator(ds, 8, **kw), 2)
    r0 = collect(BatchIterator(ds, 4, rank=0, world_size=2, **kw), 2)
    r1 = collect(BatchIterator(ds, 4, rank=1, world_size=2, **kw), 2)
    assert len(single) == len(r0) == len(r1) == (5 if drop_last else 6)
    for s, a, b in zip(single, r0, r1):
        assert torch.equal(torch.cat([a.index, b.index]), s.index)
        assert torch.equal(torch.cat([a.images, b.images]), s.images)
        assert torch.equal(torch.cat([a.labels, b.labels]), s.labels)


def test_foreign_augment_callable_sliced_per_rank():
    ds = toy(32)

    def aug(images, g):
        return images.float() + torch.rand(len(images), 1, 1, 1, generator=g)

    single = collect(BatchIterator(ds, 8, augment=aug), 0)
    ranks = [collect(BatchIterator(ds, 4, augment=aug, rank=r, world_size=2), 0) for r in (0, 1)]
    assert torch.equal(torch.cat([ranks[0][1].images, ranks[1][1].images]), single[1].images)


def test_without_labels():
    it = BatchIterator(toy(20), 5, with_labels=False)
    assert it.labels is None
    assert all(b.labels is None for b in collect(it, 0))


def test_iterator_errors():
    with pytest.raises(DataError, match="fewer than one global batch"):
        BatchIterator(toy(10), 8, world_size=2)
    with pytest.raises(DataError, match="rank"):
        BatchIterator(toy(10), 2, rank=2, world_size=2)


def test_eval_batches():
    ds = toy(23)
    batches = list(eval_batches(ds, 5))
    assert [len(b.index) for b in batches] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat([b.index for b in batches]), torch.arange(23))
    assert torch.allclose(torch.cat([b.images for b in batches]), normalize(ds.images, ds.mean, ds.std))
    shards = [torch.cat([b.index for b in eval_batches(ds, 4, rank=r, world_size=3)]) for r in range(3)]
    assert torch.equal(torch.cat(shards), torch.arange(23))
    assert all(b.labels is None for b in eval_batches(ds, 4, with_labels=False))


def test_mix_seed_is_a_fixed_function():
    assert mix_seed(0, 0, 0) == mix_seed(0, 0, 0)
    assert len({mix_seed(s, 1, e, k) for s in range(3) for e in range(3) for k in range(3)}) == 27
    assert 0 <= mix_seed(-1, 2**70) < 2**63
    assert mix_seed(1, 2, 3) == 7405809139744024400  # pinned: changing the mix changes every run's data


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_same_batches_on_gpu_as_on_cpu():
    ds = toy(40, size=16)
    aug = BatchAugment(ds.mean, ds.std, crop_padding=2, flip=True)
    cpu = collect(BatchIterator(ds, 8, seed=4, augment=aug), 1)
    gpu = collect(BatchIterator(ds, 8, seed=4, augment=aug, device="cuda"), 1)
    for a, b in zip(cpu, gpu):
        assert b.images.is_cuda and b.labels.is_cuda and b.index.is_cuda
        assert torch.equal(a.index, b.index.cpu()) and torch.equal(a.labels, b.labels.cpu())
        assert torch.allclose(a.images, b.images.cpu(), atol=1e-5)
    x = ds.images[:16]
    rrc_cpu = random_resized_crop(x, 12, generator=gen(3))
    rrc_gpu = random_resized_crop(x.cuda(), 12, generator=gen(3)).cpu()
    assert (rrc_cpu.int() - rrc_gpu.int()).abs().max() <= 1
