"""The trainer on real data: run directory contents, last vs best, teacher loading, errors, non-finite."""

from __future__ import annotations

import json

import pytest
import torch

from mimkd.checkpoint import load_checkpoint, load_weights
from mimkd.errors import CheckpointError
from mimkd.models import build_model

from helpers import SMALL_RUN, needs_fmnist, run_cli

pytestmark = needs_fmnist


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_complete_run_directory(tmp_path):
    run_cli(
        "train", "--model", "conv4mp_w32", *SMALL_RUN, "--epochs", "2", "--out", str(tmp_path), "--name", "r"
    )
    run = tmp_path / "r"
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "summary.json"):
        assert (run / name).is_file(), name
    assert any((run / "tb").iterdir())
    recs = _records(run)
    assert [r["epoch"] for r in recs] == [0, 1]
    for r in recs:
        for key in ("loss.ce", "loss.total", "lr", "test.top1", "test.top5", "images_per_s", "wall_time"):
            assert key in r
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "finished" and not s["diverged"]
    assert s["last"]["top1"] == recs[-1]["test.top1"]
    assert s["best"]["top1"] == max(r["test.top1"] for r in recs)
    assert s["last"]["top1"] > 30.0  # 10 classes: chance is 10 %
    assert s["student_params"] == 28522 and s["student_flops_per_image"] > 0
    lat = s["student_cpu_latency_ms"]  # single-image CPU latency, 1 thread and all threads
    assert set(lat) == {"1_thread", "all_threads"} and all(0 < v < 1000 for v in lat.values())
    ck = load_checkpoint(run / "last.pt")
    assert ck["arch"] == "conv4mp_w32" and ck["epoch"] == 2 and ck["step"] == 0
    # the checkpoint has the circulating {'model': state_dict} layout: it loads into a fresh model strictly
    net = build_model("conv4mp_w32", num_classes=10, in_channels=1)
    load_weights(net, run / "best.pt", "conv4mp_w32")


def test_kd_distill_uses_teacher_checkpoint_without_arch(tiny_teacher, tmp_path):
    run_cli(
        "distill",
        "--teacher",
        str(tiny_teacher),
        "--student",
        "conv4mp_w32",
        "--method",
        "kd",
        *SMALL_RUN,
        "--epochs",
        "1",
        "--out",
        str(tmp_path),
        "--name",
        "kd",
    )
    s = json.loads((tmp_path / "kd" / "summary.json").read_text())
    assert s["teacher"] == "cnn_teacher" and s["teacher_test_top1"] > 30.0
    rec = _records(tmp_path / "kd")[0]
    assert rec["loss.total"] == pytest.approx(rec["loss.ce"] + rec["loss.kd"], rel=1e-5)


def test_teacher_checkpoint_of_wrong_architecture_lists_keys(tiny_teacher, tmp_path):
    p = run_cli(
        "distill",
        "--teacher",
        str(tiny_teacher),
        "--teacher-arch",
        "conv4mp",
        "--student",
        "conv4mp_w32",
        "--method",
        "kd",
        *SMALL_RUN,
        "--epochs",
        "1",
        "--out",
        str(tmp_path),
        check=False,
    )
    assert p.returncode == 2
    assert "does not match architecture 'conv4mp'" in p.stderr
    assert "missing keys" in p.stderr and "unexpected keys" in p.stderr
    assert "cnn_teacher" in p.stderr  # the checkpoint knows what it is
    assert "Traceback" not in p.stderr


def test_load_weights_reports_shape_mismatch(tmp_path):
    a = build_model("resnet8", num_classes=10)
    torch.save({"model": a.state_dict()}, tmp_path / "r8.pth")
    with pytest.raises(
        CheckpointError, match=r"shape mismatches .*fc\.weight: checkpoint \(10, 64\) vs model \(100, 64\)"
    ):
        load_weights(build_model("resnet8", num_classes=100), tmp_path / "r8.pth", "resnet8")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "r8.pth").read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_weights(a, tmp_path / "cut.pth")


def test_repdistiller_style_checkpoint_loads(tmp_path):
    """A `{'model': state_dict, 'epoch': ..., 'accuracy': ...}` file as the CRD benchmark circulates."""
    net = build_model("resnet8x4", num_classes=100)
    torch.save({"model": net.state_dict(), "epoch": 240, "accuracy": 72.5}, tmp_path / "ckpt_epoch_240.pth")
    fresh = build_model("resnet8x4", num_classes=100)
    load_weights(fresh, tmp_path / "ckpt_epoch_240.pth", "resnet8x4")
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(x), net(x))


def test_non_finite_loss_stops_with_term_named(tmp_path):
    p = run_cli(
        "train",
        "--model",
        "conv4mp_w32",
        *SMALL_RUN,
        "--epochs",
        "1",
        "--lr",
        "1e12",
        "--out",
        str(tmp_path),
        "--name",
        "nan",
        check=False,
    )
    assert p.returncode == 2, p.stderr
    assert "non-finite loss" in p.stderr and "term(s) ce" in p.stderr
    s = json.loads((tmp_path / "nan" / "summary.json").read_text())
    assert s["status"] == "diverged"


def test_existing_run_directory_is_not_overwritten(tmp_path):
    args = (
        "train",
        "--model",
        "conv4mp_w32",
        *SMALL_RUN,
        "--epochs",
        "1",
        "--out",
        str(tmp_path),
        "--name",
        "x",
        "--set",
        "train.max_steps_per_epoch=2",
    )
    run_cli(*args)
    p = run_cli(*args, check=False)
    assert p.returncode == 2 and "already holds a run" in p.stderr and "--resume" in p.stderr
