"""KDEP (docs/methods/kdep.md): PTS values, SVD projection properties, every alignment variant on zoo models,
offline pass → method state → resume, ``svd_file`` reuse, labels never read, and real runs on Fashion-MNIST.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from mimkd.cli import main
from mimkd.config import build_config
from mimkd.distillers import build_distiller
from mimkd.distillers.kdep import ALIGNMENTS, KDEP, OFFLINE, PARAMETRIC
from mimkd.distillers.kdep_align import ALIGNMENT_FILE, FeatureStats, interp_channels, partial_l2, pts
from mimkd.engine import setup as setup_mod
from mimkd.engine.setup import run
from mimkd.errors import CheckpointError, MethodError
from mimkd.models import build_network

from helpers import SMALL_RUN, needs_fmnist, run_cli


# -- PTS ----------------------------------------------------------------------------------------------------
def test_pts_oracle_values():
    x = torch.tensor([0.0, 0.1, 0.8, -2.7], dtype=torch.float64)
    assert torch.allclose(pts(x, 0.1, 3), torch.tensor([0.0, 1.0, 2.0, -3.0], dtype=torch.float64))
    assert pts(torch.zeros(3), 0.1, 3).eq(0).all()


def test_pts_is_odd_and_monotone():
    x = torch.linspace(-50, 50, 2001, dtype=torch.float64)
    y = pts(x, 0.1, 3)
    assert torch.equal(pts(-x, 0.1, 3), -y)
    assert (y[1:] > y[:-1]).all()  # strictly increasing
    assert torch.equal(torch.sign(y), torch.sign(x))


# -- SVD projection ------------------------------------------------------------------------------------------
def _anisotropic(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    scales = torch.logspace(1, -1, d, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scales) @ mix + 3.0


def _stats_of(x: torch.Tensor, chunk: int = 37) -> dict:
    st = FeatureStats()
    for i in range(0, len(x), chunk):
        st.update(x[i : i + chunk])
    return st.finish()


def test_svd_projection_with_all_components_preserves_distances_and_decorrelates():
    x = _anisotropic(300, 12)
    res = _stats_of(x)
    assert res["num_samples"] == 300
    mu, v = res["mean"].double(), res["components"].double()
    assert torch.allclose(mu, x.mean(0), atol=1e-5)
    assert torch.allclose(v.T @ v, torch.eye(12, dtype=torch.float64), atol=1e-5)  # orthonormal
    z = (x - mu) @ v
    assert torch.allclose(torch.cdist(z, z), torch.cdist(x, x), atol=1e-3, rtol=1e-5)
    cov = (z - z.mean(0)).T @ (z - z.mean(0)) / len(z)
    off = cov - torch.diag(torch.diagonal(cov))
    assert off.abs().max() < 1e-4 * cov.diagonal().max()  # uncorrelated coordinates
    s = torch.linalg.svdvals(x - x.mean(0))
    expected = s**2 / len(x)
    assert torch.allclose(z.var(0, unbiased=False), expected, rtol=1e-4)
    assert torch.allclose(res["variances"].double(), expected, rtol=1e-4)
    assert (res["variances"][1:] <= res["variances"][:-1]).all()  # decreasing
    # the same subspace as torch's SVD: each component equals a right singular vector up to its sign
    vh = torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh
    assert torch.allclose((vh @ v).abs().diagonal(), torch.ones(12, dtype=torch.float64), atol=1e-4)


def test_feature_stats_margin_and_channel_variance():
    x = torch.tensor([[-1.0, 2.0], [-3.0, 4.0], [1.0, 6.0]])
    res = _stats_of(x, chunk=2)
    assert torch.allclose(res["margin"], torch.tensor([-2.0, 0.0]))  # E[x | x<0]; 0 when never negative
    assert torch.allclose(res["channel_var"], x.var(0, unbiased=False))


def test_partial_l2_and_interp():
    s = torch.tensor([[-3.0, -1.0, 2.0, 0.5]])
    t = torch.tensor([[-2.0, -2.0, 1.0, -1.0]])
    # element 0: s <= t <= 0 -> skipped; 1: s > t -> 1; 2: t > 0 -> 1; 3: s > t -> 2.25
    assert torch.isclose(partial_l2(s, t), torch.tensor((0 + 1 + 1 + 2.25) / 4))
    f = torch.arange(8.0).reshape(1, 8)
    assert torch.equal(interp_channels(f, 4), torch.tensor([[0.0, 2.0, 4.0, 6.0]]))


# -- the distiller on zoo models ----------------------------------------------------------------------------
def _nets(teacher: str = "resnet8x4", student: str = "resnet8", seed: int = 0):
    torch.manual_seed(seed)
    return build_network(student, 10, 3), build_network(teacher, 10, 3)


def _images(n: int = 16, seed: int = 1) -> torch.Tensor:
    """CIFAR-like 3-channel images at 16x16 (the zoo ResNets pool adaptively): a quarter of the CPU time."""
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("alignment", ALIGNMENTS)
def test_every_alignment_gives_a_finite_loss_and_gradients(alignment):
    s, t = _nets()
    x = _images()
    d = build_distiller("kdep", s, t, x[:4], alignment=alignment)
    assert d.uses_labels is False and d.requires_teacher is True
    assert d.s_point == ("layer3" if alignment == "conv1x1_post_relu" else "layer3.0.preact")
    assert d.offline_ready() is (alignment not in OFFLINE)
    if alignment in OFFLINE:
        with pytest.raises(MethodError, match="not computed"):
            d(x)
        d.offline_pass([x[:8], x[8:]], 2, None)
        assert d.offline_ready()
    d.train()
    logits, terms = d(x, object(), None)  # any "label" object: it is never read
    assert logits.shape == (16, 10) and set(terms) == {"kdep"}
    assert torch.isfinite(terms["kdep"]) and terms["kdep"] > 0
    assert torch.equal(d.metrics["kdep_mse"], terms["kdep"].detach())  # w = 1
    terms["kdep"].backward()
    grads = [p.grad for n, p in s.named_parameters() if n.startswith("layer")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert s.fc.weight.grad is None  # no logits in the loss: the classifier gets no gradient
    assert all(p.grad is None for p in t.parameters())
    if alignment in PARAMETRIC:
        assert d.connector[0].weight.grad is not None
    info = d.describe()
    assert info["alignment"]["pts_applied"] is (alignment not in PARAMETRIC)


def test_loss_weight_scales_the_term_and_svd_target_is_pts_of_projection():
    s, t = _nets()
    x = _images()
    d = build_distiller("kdep", s, t, x[:4], loss_weight=20.0)
    d.offline_pass([x], 1, None)
    d.eval()
    _, terms = d(x)
    assert torch.isclose(terms["kdep"], 20.0 * d.metrics["kdep_mse"])
    f = torch.randn(5, d.teacher_dim)
    assert torch.allclose(d.align(f), pts((f - d.mean) @ d.proj, 0.1, 3))
    d.options.pts = False
    assert torch.allclose(d.align(f), (f - d.mean) @ d.proj)


def test_student_wider_than_teacher_is_refused_for_selection_but_interp_works():
    s, t = _nets(teacher="resnet8", student="resnet8x4")  # 64-d teacher, 256-d student
    x = _images(4)
    for alignment in ("svd", "cs_var", "cs_rand"):
        with pytest.raises(MethodError, match="interp"):
            build_distiller("kdep", s, t, x, alignment=alignment)
    d = build_distiller("kdep", s, t, x, alignment="interp")
    _, terms = d(x)
    assert torch.isfinite(terms["kdep"])


def test_models_without_preact_fall_back_to_post_relu_with_a_warning():
    torch.manual_seed(0)
    s, t = build_network("conv4mp_w32", 10, 1), build_network("cnn_teacher", 10, 1)
    x = torch.randn(4, 1, 28, 28)
    with pytest.warns(UserWarning, match="pre-ReLU"):
        d = build_distiller("kdep", s, t, x, alignment="interp")
    assert (d.s_point, d.t_point) == ("block4", "block3")
    assert len(d.describe()["warnings"]) == 2
    # an explicit point (the BN output before block4's ReLU) silences the fallback
    d2 = build_distiller(
        "kdep", s, t, x, alignment="interp", student_point="block4.1", teacher_point="block3.1"
    )
    assert not d2.fallbacks and d2.student_dim == 32 and d2.teacher_dim == 128


def test_offline_pass_state_round_trip_and_svd_file_reuse(tmp_path):
    s, t = _nets()
    s0, t0 = copy.deepcopy(s), copy.deepcopy(t)
    x = _images(32)
    d = build_distiller("kdep", s, t, x[:4], alignment="svd")
    d.offline_pass(iter([x[:16], x[16:]]), 2, tmp_path)
    state = d.method_state_dict()
    assert set(state) == {"ready", "mean", "proj"} and bool(state["ready"])
    # resume: a fresh distiller (not ready) restored from the method state holds the same alignment
    d2 = build_distiller("kdep", copy.deepcopy(s0), copy.deepcopy(t0), x[:4], alignment="svd")
    assert not d2.offline_ready()
    d2.load_method_state_dict(state)
    assert d2.offline_ready()
    f = torch.randn(3, d.teacher_dim)
    assert torch.equal(d2.align(f), d.align(f))
    # the file holds all components; svd_file (the file or its run directory) skips the pass
    saved = torch.load(tmp_path / ALIGNMENT_FILE, weights_only=True)
    assert saved["components"].shape == (256, 256) and saved["num_samples"] == 32
    assert torch.equal(saved["components"][:, :64], d.proj)
    for ref in (tmp_path, tmp_path / ALIGNMENT_FILE):
        d3 = build_distiller("kdep", copy.deepcopy(s0), copy.deepcopy(t0), x[:4], svd_file=str(ref))
        assert d3.offline_ready() and torch.equal(d3.align(f), d.align(f))
    # cs_var and the margin variant reuse the same file
    d4 = build_distiller(
        "kdep", copy.deepcopy(s0), copy.deepcopy(t0), x[:4], alignment="cs_var", svd_file=str(tmp_path)
    )
    assert torch.equal(
        d4.channels, saved["channel_var"].argsort(descending=True, stable=True)[:64].sort().values
    )
    d5 = build_distiller(
        "kdep",
        copy.deepcopy(s0),
        copy.deepcopy(t0),
        x[:4],
        alignment="conv1x1_margin",
        svd_file=str(tmp_path),
    )
    assert torch.equal(d5.margin, saved["margin"]) and (d5.margin <= 0).all()


def test_svd_file_errors(tmp_path):
    s, t = _nets()
    x = _images(8)
    with pytest.raises(CheckpointError, match="does not exist"):
        build_distiller("kdep", s, t, x, svd_file=str(tmp_path / "nope.pt"))
    with pytest.raises(MethodError, match="offline"):
        build_distiller("kdep", s, t, x, alignment="interp", svd_file=str(tmp_path))
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a KDEP alignment"):
        build_distiller("kdep", s, t, x, svd_file=str(tmp_path / "other.pt"))
    s2, t2 = _nets(teacher="resnet20")  # a 64-d teacher: the 256-d file is for another teacher
    d = build_distiller("kdep", *_nets(), x, alignment="svd")
    d.offline_pass([x], 1, tmp_path)
    with pytest.raises(CheckpointError, match="another teacher"):
        build_distiller("kdep", s2, t2, x, svd_file=str(tmp_path))


# -- real runs on Fashion-MNIST -----------------------------------------------------------------------------
def _cfg(teacher, out, name: str, **train):
    return build_config(
        {
            "seed": 5,
            "threads": 2,
            "out_dir": str(out),
            "name": name,
            "data": {
                "name": "fashion_mnist",
                "train_fraction": 0.99,
                "train_subset": "rest",  # pre-train on the 1 % (600 images) a 99 % subset leaves out
                "test_fraction": 0.05,
            },
            "student": {"arch": "conv4mp_w32"},
            "teacher": {"arch": "auto", "checkpoint": str(teacher)},
            "method": {"name": "kdep"},
            "optim": {"epochs": 2, "batch_size": 32, "lr": 0.05},
            "train": {
                "progress": False,
                "eval_teacher": False,
                "tensorboard": False,
                "max_steps_per_epoch": 4,
                "checkpoint_every_steps": 2,
                **train,
            },
        }
    )


def _weights(path):
    ck = torch.load(path, map_location="cpu", weights_only=True)
    return ck["model"], ck["method_state"]


def _assert_same(a, b):
    for part_a, part_b in zip(a, b, strict=True):  # student weights, then method state
        assert part_a.keys() == part_b.keys()
        for k in part_a:
            assert torch.equal(part_a[k], part_b[k]), k


class Crash(RuntimeError):
    pass


@needs_fmnist
@pytest.mark.filterwarnings("ignore:KDEP")
def test_labels_never_reach_kdep_and_resume_is_exact(tiny_teacher, tmp_path, monkeypatch):
    """Reference run with the real labels; then the same run with the training labels replaced by garbage,
    crashed in epoch 2 and resumed: bit-identical weights and method state prove both that no label is read
    (by the method or on its behalf) and that the resume (alignment from last.pt, no second pass) is exact."""
    seen: list[object] = []
    passes: list[int] = []
    forward, offline = KDEP.forward, KDEP.offline_pass
    crash_at = {"n": -1, "calls": 0}

    def spy_forward(self, images, labels=None, index=None, ctx=None):
        seen.append(labels)
        crash_at["calls"] += 1
        if crash_at["calls"] == crash_at["n"]:
            raise Crash("simulated crash")
        return forward(self, images, labels, index, ctx)

    def spy_offline(self, batches, num_batches, run_dir):
        passes.append(num_batches)
        return offline(self, batches, num_batches, run_dir)

    monkeypatch.setattr(KDEP, "forward", spy_forward)
    monkeypatch.setattr(KDEP, "offline_pass", spy_offline)
    ref = run(_cfg(tiny_teacher, tmp_path, "ref"))
    assert ref["status"] == "finished" and "evaluation" in ref and ref["last"]["top1"] is None
    assert ref["train_images"] == 600
    assert len(seen) == 8 and all(lab is None for lab in seen)  # the trainer's batches carry no labels
    assert passes == [-(-600 // 128)]

    load_data = setup_mod.load_data

    def garbage_labels(cfg):
        train, test, augment = load_data(cfg)
        train.labels = torch.randint(0, 10, train.labels.shape, generator=torch.Generator().manual_seed(9))
        return train, test, augment

    monkeypatch.setattr(setup_mod, "load_data", garbage_labels)
    passes.clear()
    crash_at.update(n=7, calls=0)  # epoch 2, step 3: after the mid-epoch checkpoint at step 2
    with pytest.raises(Crash):
        run(_cfg(tiny_teacher, tmp_path, "cut"))
    ck = torch.load(tmp_path / "cut" / "last.pt", map_location="cpu", weights_only=True)
    assert (ck["epoch"], ck["step"]) == (1, 2) and bool(ck["method_state"]["ready"])
    crash_at.update(n=-1)
    run(_cfg(tiny_teacher, tmp_path, "cut"), resume=True)
    assert passes == [5]  # only the first session ran the offline pass
    assert all(lab is None for lab in seen)
    _assert_same(_weights(tmp_path / "ref" / "last.pt"), _weights(tmp_path / "cut" / "last.pt"))


@needs_fmnist
@pytest.mark.filterwarnings("ignore:KDEP")
def test_cli_kdep_pretraining_on_the_unlabelled_rest(tiny_teacher, tmp_path):
    args = [
        "distill", "--method", "kdep", "--teacher", str(tiny_teacher), "--student", "conv4mp_w32",
        *SMALL_RUN, "--train-fraction", "0.99", "--set", "data.train_subset=rest", "--epochs", "1",
        "--set", "train.max_steps_per_epoch=6", "--set", "method.loss_weight=3",
        "--set", "train.eval_teacher=false", "--out", str(tmp_path), "--name", "k",
    ]  # fmt: skip
    proc = run_cli(*args)
    assert "no trained classifier" in proc.stdout
    assert "pre-ReLU" in proc.stderr  # the small CNNs fall back to post-ReLU maps, and say so
    run_dir = tmp_path / "k"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["method"] == "kdep"
    assert summary["evaluation"].startswith("none") and summary["train_images"] == 600
    rec = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert "test.top1" not in rec and rec["loss.kdep"] > 0 and "train.top1" not in rec
    alignment = torch.load(run_dir / ALIGNMENT_FILE, weights_only=True)
    ck = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert ck["method"] == "kdep" and bool(ck["method_state"]["ready"])
    assert torch.equal(ck["method_state"]["proj"], alignment["components"][:, :32])
    assert alignment["teacher_point"] == "block3" and alignment["num_samples"] == 600
    # the finished run resumes from last.pt: nothing left to do, no second offline pass
    mtime = (run_dir / ALIGNMENT_FILE).stat().st_mtime_ns
    assert main([*args, "--resume"]) == 0  # in-process: the same CLI without a second interpreter start
    assert (run_dir / ALIGNMENT_FILE).stat().st_mtime_ns == mtime
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
