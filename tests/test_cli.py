"""The real CLI: describe, foreign models, CIFAR-format data end to end, and one-line errors."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from mimkd.models import build_model

from helpers import SMALL_RUN, needs_fmnist, run_cli

TESTS = str(Path(__file__).parent)


def test_describe_mimkd_default_options_json_and_text():
    p = run_cli(
        "describe", "--teacher", "resnet32x4", "--student", "resnet8x4", "--method", "mimkd", "--json"
    )
    info = json.loads(p.stdout)
    assert [(x["teacher"], x["student"]) for x in info["pairs"]] == [
        ("layer1", "layer1"),
        ("layer2", "layer2"),
        ("layer3", "layer3"),
    ]
    assert info["critics"]["feature_critic_0"]["layers"][0] == "layers.0: conv1x1 128->512"
    assert info["params"]["student"] == 1233540 and info["params"]["teacher"] == 7433860
    f = info["flops_per_image"]
    assert f["method_train_step"] > f["student_train_step"] > f["student_forward"] > 0
    text = run_cli("describe", "--teacher", "resnet32x4", "--student", "vgg8").stdout
    assert "teacher layer2 (128, 16, 16)  <->  student relu1 (128, 16, 16)" in text
    assert "FLOPs per image" in text


def test_describe_without_teacher_for_cohort_methods_and_kdep_offline_pass():
    info = json.loads(run_cli("describe", "--student", "resnet8", "--method", "dcm", "--json").stdout)
    assert info["teacher"] is None and info["params"]["teacher"] == 0
    assert info["flops_per_image"]["teacher_forward"] == 0 and info["params"]["method_trainable"] > 0
    p = run_cli("describe", "--student", "resnet8", "--method", "kd", check=False)
    assert p.returncode == 2 and "pass --teacher" in p.stderr and "Traceback" not in p.stderr
    # kdep's default alignment needs its offline SVD: describe runs it on the probe batch
    text = run_cli("describe", "--teacher", "resnet20", "--student", "resnet8", "--method", "kdep").stdout
    assert "teacher features read" in text


def test_unknown_names_get_suggestions_and_exit_2():
    p = run_cli("describe", "--teacher", "resnet32x5", "--student", "resnet8x4", check=False)
    assert p.returncode == 2 and "unknown model 'resnet32x5'" in p.stderr and "resnet32x4" in p.stderr
    p = run_cli(
        "describe", "--teacher", "resnet32x4", "--student", "resnet8x4", "--method", "mimdk", check=False
    )
    assert p.returncode == 2 and "mimkd" in p.stderr and "Traceback" not in p.stderr
    p = run_cli("train", "--model", "resnet8", "--data", "cifar1000", check=False)
    assert p.returncode == 2 and "cifar100" in p.stderr


def _write_cifar100(root: Path, n_train: int, n_test: int) -> Path:
    """A cifar-100-python directory in the real format (bytes-keyed pickles, N×3072 uint8 rows)."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 100
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        data[:, :1024] = (labels[:, None] * 2).astype(np.uint8)  # a learnable signal in the red plane
        obj = {
            b"data": data,
            b"fine_labels": labels.tolist(),
            b"coarse_labels": (labels // 5).tolist(),
            b"filenames": [f"{i}.png".encode() for i in range(n)],
            b"batch_label": name.encode(),
        }
        (d / name).write_bytes(pickle.dumps(obj, protocol=2))
    meta = {
        b"fine_label_names": [f"c{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"s{i}".encode() for i in range(20)],
    }
    (d / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return d


def test_train_and_distill_on_cifar100_format_with_repdistiller_teacher(tmp_path):
    data = _write_cifar100(tmp_path / "data", n_train=300, n_test=100)
    common = [
        "--data",
        "cifar100",
        "--data-root",
        str(data),
        "--batch-size",
        "50",
        "--no-progress",
        "--out",
        str(tmp_path / "runs"),
    ]
    run_cli("train", "--model", "resnet8", *common, "--epochs", "1", "--name", "t")
    s = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert s["train_images"] == 300 and s["test_images"] == 100 and s["status"] == "finished"
    # a teacher file as the CRD benchmark circulates them: {'model': state_dict}, no architecture recorded
    torch.save({"model": build_model("resnet14").state_dict()}, tmp_path / "ckpt_epoch_240.pth")
    p = run_cli(
        "distill",
        "--teacher",
        str(tmp_path / "ckpt_epoch_240.pth"),
        "--student",
        "resnet8",
        "--method",
        "kd",
        *common,
        "--epochs",
        "1",
        "--name",
        "kd",
        check=False,
    )
    assert p.returncode == 2 and "--teacher-arch" in p.stderr
    run_cli(
        "distill",
        "--teacher",
        str(tmp_path / "ckpt_epoch_240.pth"),
        "--teacher-arch",
        "resnet14",
        "--student",
        "resnet8",
        "--method",
        "mimkd",
        "--set",
        "method.critic_width=16",
        "--set",
        "method.num_negatives=64",
        *common,
        "--epochs",
        "1",
        "--name",
        "mimkd",
    )
    rec = json.loads((tmp_path / "runs" / "mimkd" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss.mi_global", "loss.mi_local", "loss.mi_feature"} <= set(rec)


@needs_fmnist
def test_foreign_model_from_module_factory_with_explicit_points(tiny_teacher, tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}
    args = [
        "distill",
        "--teacher",
        str(tiny_teacher),
        "--student",
        "foreign_models:plain_cnn",
        "--method",
        "mimkd",
        "--set",
        "method.critic_width=16",
        "--set",
        "method.num_negatives=64",
        *SMALL_RUN,
        "--epochs",
        "1",
        "--out",
        str(tmp_path),
    ]
    run_cli(*args, "--name", "auto", env_extra=env)  # points discovered by a probe batch
    s = json.loads((tmp_path / "auto" / "summary.json").read_text())
    assert s["student"] == "foreign_models:plain_cnn" and s["status"] == "finished"
    bad = run_cli(*args, "--name", "bad", "--set", "student.stages=[3, 77]", env_extra=env, check=False)
    assert bad.returncode == 2 and "no module '77'" in bad.stderr
    run_cli(
        *args,
        "--name",
        "explicit",
        "--set",
        "student.stages=[2, 6]",
        "--set",
        "student.embedding=12:input",
        env_extra=env,
    )
