"""``mimkd export RUN --format hf`` and teachers in the Hub layout (docs/teachers.md): the folder, its model
card, equal logits when loaded back, ``--teacher FOLDER`` and ``--teacher hf:ORG/REPO`` from a real
huggingface_hub cache with ``HF_HUB_OFFLINE=1``."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkd.engine.setup import load_teacher
from mimkd.errors import ConfigError
from mimkd.evaluation.export import load_student
from mimkd.evaluation.export_hf import load_hf_model
from mimkd.models import build_model
from mimkd.teachers import resolve_teacher

from helpers import run_cli


def write_cifar100(root: Path, n_train: int = 100, n_test: int = 50) -> Path:
    """A small cifar-100-python directory in the real format (bytes-keyed pickles, N×3072 uint8 rows)."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("train", n_train), ("test", n_test)):
        labels = np.arange(n) % 100
        obj = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"fine_labels": labels.tolist(),
            b"coarse_labels": (labels // 5).tolist(),
            b"filenames": [f"{i}.png".encode() for i in range(n)],
            b"batch_label": name.encode(),
        }
        (d / name).write_bytes(pickle.dumps(obj, protocol=2))
    meta = {b"fine_label_names": [f"c{i}".encode() for i in range(100)], b"coarse_label_names": []}
    (d / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return d


def tiny_run_flags(data: Path, out: Path) -> list[str]:
    """The smallest real distill settings: 100 CIFAR-format images, 2 steps of 50, one epoch."""
    return [
        *("--data", "cifar100", "--data-root", str(data), "--batch-size", "50", "--epochs", "1"),
        *("--set", "train.max_steps_per_epoch=2", "--threads", "1", "--no-progress", "--out", str(out)),
    ]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A real tiny kd run (resnet14 teacher file -> resnet8 on CIFAR-100-format data), exported as hf."""
    pytest.importorskip("safetensors")
    root = tmp_path_factory.mktemp("hf")
    data = write_cifar100(root / "data")
    torch.save({"model": build_model("resnet14").state_dict()}, root / "teacher.pth")
    flags = tiny_run_flags(data, root / "runs")
    teacher = ["--teacher", str(root / "teacher.pth"), "--teacher-arch", "resnet14"]
    run_cli("distill", *teacher, "--student", "resnet8", "--method", "kd", *flags, "--name", "kd")
    run = root / "runs" / "kd"
    p = run_cli("export", str(run), "--format", "hf")
    folder = run / "export" / "best-hf"
    assert f"-> {folder} (hf," in p.stdout and "max abs difference 0 " in p.stdout
    return {"root": root, "run": run, "folder": folder, "data": data}


def test_the_folder_holds_weights_config_and_a_model_card_from_the_run(exported):
    folder, run = exported["folder"], exported["run"]
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    cfg = json.loads((folder / "config.json").read_text())
    ck = torch.load(run / "best.pt", weights_only=True)
    assert (cfg["architecture"], cfg["num_classes"], cfg["in_channels"]) == ("resnet8", 100, 3)
    assert cfg["class_names"] == [f"c{i}" for i in range(100)]
    inp = cfg["input"]
    assert (inp["channels"], inp["height"], inp["width"]) == (3, 32, 32)
    assert inp["mean"] == pytest.approx(ck["input"]["mean"]) and inp["std"] == pytest.approx(
        ck["input"]["std"]
    )
    s = json.loads((run / "summary.json").read_text())
    assert (cfg["method"], cfg["teacher"], cfg["dataset"]) == ("kd", "resnet14", "cifar100")
    assert cfg["test_top1"] == s["best"]["top1"]
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: mimkd\n") and "- cifar100\n" in card
    assert "| method | kd |" in card and "| teacher | resnet14 (test top-1" in card
    assert f"| test top-1 | {s['best']['top1']:.2f} %" in card and "3×32×32" in card
    # exporting again replaces the earlier export; a folder that is not one is refused
    run_cli("export", str(run), "--format", "hf")
    other = exported["root"] / "not-an-export"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    p = run_cli("export", str(run), "--format", "hf", "--out", str(other), check=False)
    assert p.returncode == 2 and "is not an earlier `--format hf` export" in p.stderr
    assert [q.name for q in other.iterdir()] == ["notes.txt"]


def test_loaded_back_it_gives_the_students_logits_exactly(exported):
    net, cfg = load_hf_model(exported["folder"])
    student, _ = load_student(exported["run"] / "best.pt")
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(net(x), student(x))


def test_teacher_from_a_folder_loads_with_its_architecture_and_input(exported, tmp_path, monkeypatch):
    monkeypatch.setenv("MIMKD_HOME", str(tmp_path / "home"))
    checkpoint, arch = resolve_teacher(str(exported["folder"]), None)
    assert arch == "resnet8" and Path(checkpoint).parent == tmp_path / "home" / "pretrained" / "hf"
    teacher, _ = load_teacher(arch, checkpoint, 100, 3, input_shape=(3, 32, 32))
    student, _ = load_student(exported["run"] / "best.pt")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher.eval()(x), student(x))
    assert resolve_teacher(str(exported["folder"]), "resnet8")[0] == checkpoint  # converted once
    with pytest.raises(ConfigError, match="is a 'resnet8' \\(its config.json\\), not 'resnet20'"):
        resolve_teacher(str(exported["folder"]), "resnet20")
    with pytest.raises(ConfigError, match="trained on 3×32×32 images"):
        load_teacher(arch, checkpoint, 100, 3, input_shape=(3, 64, 64))


def _hub_cache(cache: Path, repo: str, folder: Path) -> str:
    """``folder`` as huggingface_hub stores a downloaded repository: blobs by sha256, a snapshot of links
    named by the commit, ``refs/main`` naming the commit."""
    base = cache / f"models--{repo.replace('/', '--')}"
    rev = hashlib.sha1(repo.encode()).hexdigest()
    (base / "blobs").mkdir(parents=True)
    (base / "snapshots" / rev).mkdir(parents=True)
    for f in folder.iterdir():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        (base / "blobs" / digest).write_bytes(f.read_bytes())
        os.symlink(f"../../blobs/{digest}", base / "snapshots" / rev / f.name)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(rev)
    return rev


def test_teacher_hf_repo_from_the_offline_hub_cache_in_a_distill_run(exported, tmp_path):
    pytest.importorskip("huggingface_hub")
    _hub_cache(tmp_path / "hub", "mimkd-tests/resnet8-kd", exported["folder"])
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "MIMKD_HOME": str(tmp_path / "home")}
    flags = tiny_run_flags(exported["data"], tmp_path / "runs")
    common = ["distill", "--student", "resnet8", "--method", "kd", *flags]
    run_cli(*common, "--teacher", "hf:mimkd-tests/resnet8-kd", "--name", "hf", env_extra=env)
    s = json.loads((tmp_path / "runs" / "hf" / "summary.json").read_text())
    assert s["status"] == "finished" and s["teacher"] == "resnet8" and s["teacher_test_top1"] is not None
    p = run_cli(*common, "--teacher", "hf:mimkd-tests/absent", "--name", "absent", check=False, env_extra=env)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert (
        "mimkd-tests/absent is not in the huggingface_hub cache" in p.stderr and "HF_HUB_OFFLINE" in p.stderr
    )


def test_without_huggingface_hub_hf_teachers_name_the_extra():
    code = (
        "import sys; sys.modules['huggingface_hub'] = None\n"  # what an environment without it imports
        "from mimkd.teachers import resolve_teacher\n"
        "try:\n    resolve_teacher('hf:org/repo', None)\n"
        "except Exception as e:\n    print(type(e).__name__, e)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert (
        out.strip()
        == "MimkdError --teacher hf:org/repo: needs the huggingface_hub package: pip install 'mimkd[hub]'"
    )
