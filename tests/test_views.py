"""Extra views of a batch (``Capabilities(views=...)``, mimkd.data.views): MLKD's strong view.

The data loader's views are a pure function of (seed, epoch, step) like its primary images (a resumed epoch
yields the same views), a data-parallel group's slices make up the single-process view, and a real MLKD run
on real Fashion-MNIST data (a real tiny teacher) crashed mid-epoch and resumed ends bit-identical to an
uninterrupted one.
"""

from __future__ import annotations

import json

import pytest
import torch

from mimkd.config import build_config
from mimkd.data import BatchAugment, BatchIterator, ImageDataset
from mimkd.data.views import StrongAugment, build_views
from mimkd.distillers import register_distiller
from mimkd.distillers.mlkd import MLKD
from mimkd.distillers.registry import _METHODS
from mimkd.engine.setup import run
from mimkd.errors import ConfigError

from helpers import needs_fmnist


def _dataset(n: int = 40, channels: int = 3, size: int = 16) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 4
    return ImageDataset(images, labels, list("abcd"), (0.5,) * channels, (0.25,) * channels)


def _iterator(ds: ImageDataset, **kw) -> BatchIterator:
    base = BatchAugment(ds.mean, ds.std, crop_padding=2, flip=True)
    return BatchIterator(ds, 8, seed=3, augment=base, views=build_views(["strong"], base), **kw)


def test_views_are_reproducible_and_resume_exactly():
    ds = _dataset()
    it = _iterator(ds)
    whole = list(it.epoch(1))
    again = list(_iterator(ds).epoch(1))
    resumed = list(it.epoch(1, start_step=2))
    assert len(whole) == 5 and set(whole[0].views) == {"strong"}
    for a, b in zip(whole, again):
        assert torch.equal(a.views["strong"], b.views["strong"])
    for a, b in zip(whole[2:], resumed):
        assert torch.equal(a.images, b.images) and torch.equal(a.views["strong"], b.views["strong"])
    b0 = whole[0]
    assert b0.views["strong"].shape == b0.images.shape and b0.views["strong"].dtype == torch.float32
    assert not torch.equal(b0.views["strong"], b0.images)  # its own crop, flip and RandAugment
    other_epoch = next(iter(it.epoch(2)))
    assert not torch.equal(other_epoch.views["strong"], b0.views["strong"])


def test_the_primary_view_is_unchanged_by_asking_for_views():
    ds = _dataset()
    base = BatchAugment(ds.mean, ds.std, crop_padding=2, flip=True)
    plain = list(BatchIterator(ds, 8, seed=3, augment=base).epoch(0))
    with_views = list(_iterator(ds).epoch(0))
    assert all(torch.equal(a.images, b.images) for a, b in zip(plain, with_views))
    assert all(not a.views for a in plain)


def test_data_parallel_slices_make_up_the_single_process_view():
    ds = _dataset()
    single = list(_iterator(ds).epoch(0))
    base = BatchAugment(ds.mean, ds.std, crop_padding=2, flip=True)
    ranks = [
        list(
            BatchIterator(
                ds, 4, seed=3, augment=base, views=build_views(["strong"], base), rank=r, world_size=2
            ).epoch(0)
        )
        for r in (0, 1)
    ]
    for s, a, b in zip(single, *ranks):
        assert torch.equal(s.views["strong"], torch.cat([a.views["strong"], b.views["strong"]]))


def test_unknown_views_are_refused_naming_the_known_ones():
    ds = _dataset()
    with pytest.raises(ConfigError, match="unknown view 'sepia'.*strong"):
        build_views(["sepia"], BatchAugment(ds.mean, ds.std))


def test_strong_view_of_a_resized_crop_keeps_the_crop_size():
    ds = _dataset(size=20)
    strong = StrongAugment(BatchAugment(ds.mean, ds.std, flip=True, resized_crop=12))
    out = strong(ds.images[:6], torch.Generator().manual_seed(0))
    assert out.shape == (6, 3, 12, 12) and torch.isfinite(out).all()


# -- a real run: crash, resume, bit-identical -------------------------------------------------------------
CRASH_AT: dict[str, int] = {}
STEPS = 4


class Crash(RuntimeError):
    pass


def _register() -> None:
    if "_mlkd_crash" in _METHODS:
        return

    @register_distiller("_mlkd_crash")
    class CrashingMLKD(MLKD):
        calls = 0

        def compute(self, images, labels, index=None, ctx=None):
            if ctx is not None and ctx.stage == "main":
                type(self).calls += 1
                if CRASH_AT.get("call") == type(self).calls:
                    raise Crash("simulated crash")
            return super().compute(images, labels, index, ctx)


def _cfg(tiny_teacher, tmp_path, name: str):
    return build_config(
        {
            "seed": 2,
            "threads": 1,
            "out_dir": str(tmp_path),
            "name": name,
            "data": {"name": "fashion_mnist", "train_fraction": 0.02, "test_fraction": 0.05},
            "student": {"arch": "conv4mp_w32"},
            "teacher": {"arch": "cnn_teacher", "checkpoint": str(tiny_teacher)},
            "method": {"name": "_mlkd_crash"},
            "optim": {"epochs": 2, "batch_size": 32, "lr": 0.05},
            "train": {
                "progress": False,
                "eval_teacher": False,
                "checkpoint_every_steps": 2,
                "max_steps_per_epoch": STEPS,
            },
        }
    )


@needs_fmnist
def test_an_mlkd_run_resumes_bit_identical(tiny_teacher, tmp_path):
    _register()
    CRASH_AT.clear()
    ref = run(_cfg(tiny_teacher, tmp_path, "ref"))
    assert ref["status"] == "finished"
    records = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    epoch_rows = [r for r in records if "test.top1" in r]
    assert len(epoch_rows) == 2
    assert all(r[f"loss.{t}"] > 0 for r in epoch_rows for t in ("ce", "kd", "cc", "bc")), epoch_rows
    _METHODS["_mlkd_crash"].calls = 0
    CRASH_AT["call"] = 7  # epoch 1, step 2 (after the checkpoint at step 2 of that epoch)
    with pytest.raises(Crash):
        run(_cfg(tiny_teacher, tmp_path, "cut"))
    CRASH_AT.clear()
    resumed = run(_cfg(tiny_teacher, tmp_path, "cut"), resume=True)
    assert resumed["status"] == "finished"
    a = torch.load(tmp_path / "ref" / "last.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after the resume"


def test_every_method_takes_the_views_keyword():
    """A distiller that overrides ``forward`` (KDEP drops labels there) must still pass ``views`` through."""
    import inspect

    from mimkd.distillers import available, get_method

    for name in available():
        params = inspect.signature(get_method(name).forward).parameters
        assert "views" in params, f"{name}.forward does not take views="
