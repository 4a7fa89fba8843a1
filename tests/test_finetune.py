"""``mimkd finetune`` (docs/methods/kdep.md, KDEP supplementary B.2): backbone loaded, classifier
re-initialised, linear mode frozen bit for bit (weights AND BatchNorm buffers), full mode trained, the
``kdep`` preset's milestones, exact resume, and clear errors for checkpoints that cannot be fine-tuned.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from mimkd.checkpoint import FORMAT, VERSION
from mimkd.cli import main
from mimkd.config import FinetuneConfig, build_config
from mimkd.distillers.vanilla import Vanilla
from mimkd.engine.finetune import finetune_config, init_student, inspect_checkpoint, third_milestones
from mimkd.engine.setup import prepare, run
from mimkd.errors import CheckpointError, ConfigError, ModelError
from mimkd.models import build_network

from helpers import needs_fmnist, run_cli


def _fake_checkpoint(path, arch: str = "conv4mp_w32", classes: int = 7, channels: int = 1, **extra):
    """A mimkd-style checkpoint of ``arch`` for ``classes`` classes, with non-default BN buffers."""
    torch.manual_seed(3)
    net = build_network(arch, classes, channels)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(17)
    ck = {"format": FORMAT, "version": VERSION, "model": net.state_dict(), "arch": arch}
    ck.update({"num_classes": classes, "in_channels": channels, **extra})
    torch.save(ck, path)
    return net


def _backbone(sd: dict, head: str = "fc") -> dict:
    return {k: v for k, v in sd.items() if not k.startswith(f"{head}.")}


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- unit level ---------------------------------------------------------------------------------------------
def test_third_milestones():
    assert third_milestones(150) == [50, 100]
    assert third_milestones(15) == [5, 10]
    assert third_milestones(3) == [1, 2]
    assert third_milestones(2) == [1]
    assert third_milestones(1) == []


def test_kdep_preset_fills_what_the_user_left_unset(tmp_path):
    ck = tmp_path / "src.pt"
    _fake_checkpoint(ck)
    cfg = finetune_config(str(ck), {"optim": {"epochs": 15}}, preset="kdep")
    o = cfg.resolved().optim
    assert (o.optimizer, o.momentum, o.nesterov, o.batch_size, o.weight_decay) == (
        "sgd",
        0.9,
        False,
        64,
        5e-4,
    )
    assert (o.lr, o.schedule, o.milestones, o.gamma, o.epochs) == (0.01, "step", [5, 10], 0.1, 15)
    assert cfg.student.arch == "conv4mp_w32" and cfg.method.name == "vanilla" and cfg.teacher is None
    assert cfg.finetune == FinetuneConfig(checkpoint=str(ck), mode="full")
    assert cfg.name == "finetune_full_conv4mp_w32_fashion_mnist_s0"
    o = finetune_config(str(ck), {}, preset="kdep").resolved().optim
    assert (o.epochs, o.milestones) == (150, [50, 100])
    # whatever the user sets wins: flags, --set and the mode
    cfg = finetune_config(
        str(ck), {"optim": {"lr": 0.001}}, None, ["optim.milestones=[7]"], mode="linear", preset="kdep"
    )
    assert (cfg.optim.lr, cfg.optim.milestones, cfg.finetune.mode) == (0.001, [7], "linear")
    assert cfg.name.startswith("finetune_linear_")
    # without a preset the dataset's recipe applies
    assert finetune_config(str(ck), {}).resolved().optim.recipe == "fashion_mnist"


def test_backbone_loaded_and_classifier_reinitialised_for_another_class_count(tmp_path):
    ck = tmp_path / "src.pt"
    source = _fake_checkpoint(ck, classes=7)
    torch.manual_seed(0)
    student = build_network("conv4mp_w32", 10, 1)
    fresh_head = student.fc.weight.detach().clone()
    info = init_student(student, FinetuneConfig(checkpoint=str(ck)), "conv4mp_w32", 1)
    _assert_equal(_backbone(student.state_dict()), _backbone(source.state_dict()))
    assert student.fc.weight.shape == (10, 32) and torch.equal(student.fc.weight, fresh_head)
    assert info["classifier"] == "fc" and info["checkpoint_classes"] == 7 and info["mode"] == "full"
    assert all(p.requires_grad for p in student.parameters())


@pytest.mark.parametrize("arch", ["conv4mp_w32", "cnn_teacher"])
def test_linear_mode_freezes_the_backbone_and_keeps_it_in_eval_mode(tmp_path, arch):
    ck = tmp_path / "src.pt"
    source = _fake_checkpoint(ck, arch=arch)
    student = build_network(arch, 10, 1)
    info = init_student(student, FinetuneConfig(checkpoint=str(ck), mode="linear"), arch, 1)
    head = student.fc
    assert info["trainable_params"] == head.weight.numel() + head.bias.numel()
    assert [n for n, p in student.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    student.train()  # what the trainer does every epoch
    assert student.training and head.training
    assert all(not m.training for n, m in student.named_modules() if n not in ("", "fc"))
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5, weight_decay=5e-4)
    before = head.weight.detach().clone()
    for _ in range(3):
        loss = nn.functional.cross_entropy(student(torch.randn(8, 1, 28, 28)), torch.randint(0, 10, (8,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    _assert_equal(_backbone(student.state_dict()), _backbone(source.state_dict()))  # BN buffers included
    assert not torch.equal(head.weight, before)
    student.eval()
    student.train()
    assert all(not m.training for n, m in student.named_modules() if n not in ("", "fc"))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        inspect_checkpoint(tmp_path / "junk.pt")
    torch.save({"epoch": 3}, tmp_path / "noweights.pt")
    with pytest.raises(CheckpointError, match="no model weights"):
        inspect_checkpoint(tmp_path / "noweights.pt")
    torch.save({"model": build_network("conv4mp_w32", 10, 1).state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="--arch"):
        inspect_checkpoint(tmp_path / "bare.pt")
    assert inspect_checkpoint(tmp_path / "bare.pt", arch="conv4mp_w32").arch == "conv4mp_w32"
    _fake_checkpoint(tmp_path / "odd.pt")
    ck = torch.load(tmp_path / "odd.pt", weights_only=True)
    torch.save({**ck, "arch": "conv4mp_w33"}, tmp_path / "odd.pt")
    with pytest.raises(ModelError, match="conv4mp_w33.*Did you mean"):
        inspect_checkpoint(tmp_path / "odd.pt")
    # channel mismatch with the data, architecture mismatch, weights that do not fit the architecture
    _fake_checkpoint(tmp_path / "grey.pt")
    spec = FinetuneConfig(checkpoint=str(tmp_path / "grey.pt"))
    with pytest.raises(ConfigError, match="1-channel images but the data has 3"):
        init_student(build_network("conv4mp_w32", 10, 3), spec, "conv4mp_w32", 3)
    with pytest.raises(CheckpointError, match="holds a 'conv4mp_w32', not the student 'conv4mp'"):
        init_student(build_network("conv4mp", 10, 1), spec, "conv4mp", 1)
    bare = FinetuneConfig(checkpoint=str(tmp_path / "bare.pt"))
    with pytest.raises(CheckpointError, match="does not fit the backbone"):
        init_student(build_network("conv4mp", 10, 1), bare, "conv4mp", 1)
    with pytest.raises(ConfigError, match="set only one"):
        build_config(
            {"student": {"arch": "conv4mp", "checkpoint": "a.pt"}, "finetune": {"checkpoint": "b.pt"}}
        )
    proc = run_cli("finetune", str(tmp_path / "missing.pt"), check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


# -- real runs on Fashion-MNIST and digits ------------------------------------------------------------------
def _cfg(teacher, out, name: str, mode: str, epochs: int = 1, **train):
    base = {
        "seed": 4,
        "threads": 2,
        "out_dir": str(out),
        "name": name,
        "data": {"name": "fashion_mnist", "train_fraction": 0.02, "test_fraction": 0.05},
        "optim": {"epochs": epochs, "batch_size": 32},
        "train": {"progress": False, "tensorboard": False, "max_steps_per_epoch": 6, **train},
    }
    return finetune_config(str(teacher), base, mode=mode, preset="kdep")


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@needs_fmnist
def test_linear_mode_run_changes_only_the_classifier(tiny_teacher, tmp_path):
    cfg = _cfg(tiny_teacher, tmp_path, "lin", "linear")
    initial_head = prepare(cfg).distiller.student.fc.weight.detach().clone()
    summary = run(cfg)
    assert summary["status"] == "finished" and summary["last"]["top1"] is not None
    assert (
        summary["finetune"]["mode"] == "linear" and summary["finetune"]["trainable_params"] == 128 * 10 + 10
    )
    assert summary["method_params"] == 0
    ck = _ckpt(tmp_path / "lin" / "last.pt")
    source = _ckpt(tiny_teacher)["model"]
    _assert_equal(_backbone(ck["model"]), _backbone(source))  # weights AND BN running stats / counters
    assert not torch.equal(ck["model"]["fc.weight"], initial_head)  # the classifier trained
    assert not torch.equal(ck["model"]["fc.weight"], source["fc.weight"])  # ... from a fresh initialisation
    assert len(ck["optimizer"]["param_groups"][0]["params"]) == 2  # only the classifier is optimised


class Crash(RuntimeError):
    pass


@needs_fmnist
def test_full_mode_trains_everything_and_resumes_exactly(tiny_teacher, tmp_path, monkeypatch):
    ref = run(_cfg(tiny_teacher, tmp_path, "ref", "full", epochs=2, checkpoint_every_steps=2))
    assert ref["finetune"]["trainable_params"] == ref["student_params"]
    ck = _ckpt(tmp_path / "ref" / "last.pt")
    source = _ckpt(tiny_teacher)["model"]
    for key in ("block1.0.weight", "block3.1.running_mean", "hidden.weight"):
        assert not torch.equal(ck["model"][key], source[key]), key
    assert ck["model"]["block1.1.num_batches_tracked"] == source["block1.1.num_batches_tracked"] + 12
    # a crash in epoch 2 after its mid-epoch checkpoint, then --resume: bit-identical to the reference
    compute, calls = Vanilla.compute, {"n": 0}

    def crashing(self, images, labels, index=None):
        calls["n"] += 1
        if calls["n"] == 10:
            raise Crash("simulated crash")
        return compute(self, images, labels, index)

    monkeypatch.setattr(Vanilla, "compute", crashing)
    with pytest.raises(Crash):
        run(_cfg(tiny_teacher, tmp_path, "cut", "full", epochs=2, checkpoint_every_steps=2))
    cut = _ckpt(tmp_path / "cut" / "last.pt")
    assert (cut["epoch"], cut["step"]) == (1, 2)
    monkeypatch.setattr(Vanilla, "compute", compute)
    run(_cfg(tiny_teacher, tmp_path, "cut", "full", epochs=2, checkpoint_every_steps=2), resume=True)
    cut = _ckpt(tmp_path / "cut" / "last.pt")
    _assert_equal(cut["model"], ck["model"])


@needs_fmnist
def test_cli_finetune_a_run_directory_on_digits(tiny_teacher, tmp_path):
    args = [
        "finetune", str(tiny_teacher.parent), "--data", "digits", "--image-size", "28", "--mode", "linear",
        "--preset", "kdep", "--epochs", "3", "--batch-size", "32", "--threads", "2", "--no-progress",
        "--set", "train.max_steps_per_epoch=3", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = run_cli(*args)
    assert "top-1" in proc.stdout
    run_dir = tmp_path / "finetune_linear_cnn_teacher_digits_s0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["data"] == "digits" and summary["method"] == "vanilla"
    assert summary["finetune"]["checkpoint"] == str(tiny_teacher.parent)
    assert summary["last"]["top1"] is not None and summary["finetune"]["checkpoint_method"] == "vanilla"
    optim = yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]
    assert (optim["milestones"], optim["lr"], optim["weight_decay"]) == ([1, 2], 0.01, 5e-4)
    lrs = [json.loads(x)["lr"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([0.01, 0.001, 0.0001])
    _assert_equal(_backbone(_ckpt(run_dir / "last.pt")["model"]), _backbone(_ckpt(tiny_teacher)["model"]))
    # the finished run resumes from its last.pt: nothing left to train, the weights stay
    before = _ckpt(run_dir / "last.pt")["model"]
    assert main([*args, "--resume"]) == 0  # in-process: the same CLI without a second interpreter start
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "finished"
    _assert_equal(_ckpt(run_dir / "last.pt")["model"], before)
