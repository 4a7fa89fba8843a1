"""Nothing lost: the real CLI on bad input gives one clear line and exit status 2, never a traceback; a
process killed while writing a checkpoint leaves the previous one intact.

Exact-resume after SIGKILL at a random step is ``test_resume.py``; non-finite losses are ``test_trainer.py``.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkd.checkpoint import atomic_save, load_checkpoint

from helpers import FMNIST, SMALL_RUN, needs_fmnist, run_cli

RUN = ["--epochs", "1", "--set", "train.max_steps_per_epoch=2"]


def _idx(array: np.ndarray) -> bytes:
    header = (0x0800 | array.ndim).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def _fmnist_copy(tmp: Path) -> Path:
    root = tmp / "fm"
    shutil.copytree(FMNIST.parent, root)
    return root


def _truncated_images(tmp: Path) -> list[str]:
    root = _fmnist_copy(tmp)
    f = root / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ["--data-root", str(root)]


def _fewer_labels(tmp: Path) -> list[str]:
    root = _fmnist_copy(tmp)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(np.zeros(59_000, np.uint8))))
    return ["--data-root", str(root)]


def _unwritable(tmp: Path) -> list[str]:
    blocker = tmp / "a_file"  # a run directory below a file cannot be created, not even by root
    blocker.write_text("x")
    return ["--out", str(blocker / "runs")]


def _wrong_teacher(tmp: Path) -> list[str]:
    path = tmp / "t.pth"
    torch.save({"model": {"conv.weight": torch.zeros(3)}}, path)
    return ["--teacher", str(path), "--teacher-arch", "cnn_teacher", "--method", "kd"]


# (case, extra CLI arguments or a function of tmp_path returning them, text the one-line message must hold)
CASES = [
    ("config key typo", ["--set", "optim.weight_decai=0.1"], "weight_decay"),
    ("config wrong type", ["--set", "optim.batch_size=lots"], "optim.batch_size"),
    ("method option typo", ["--method", "mimkd", "--set", "method.lamda_l=0.5"], "lambda_l"),
    ("unknown model", ["--student", "resnet8x"], "resnet8x4"),
    ("unknown method", ["--method", "mimdk"], "mimkd"),
    ("unknown dataset", ["--data", "fashion_mnst"], "fashion_mnist"),
    ("teacher checkpoint of another architecture", _wrong_teacher, "missing"),
    ("truncated dataset file", _truncated_images, "train-images-idx3-ubyte"),
    ("images and labels of different lengths", _fewer_labels, "59000"),
    ("training fraction leaving a class empty", ["--train-fraction", "0.00001"], "class"),
    ("unwritable run directory", _unwritable, "cannot write to run directory"),
    (
        "teacher checkpoint that does not exist",
        ["--teacher", "/nonexistent/t.pth", "--method", "kd"],
        "exist",
    ),
]


@needs_fmnist
@pytest.mark.parametrize(("case", "extra", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line_and_exit_2(tmp_path, case, extra, needle):
    args = extra(tmp_path) if callable(extra) else list(extra)
    base = ["distill", "--student", "conv4mp_w32", *SMALL_RUN, *RUN, "--out", str(tmp_path / "runs")]
    if "--method" not in args:
        base += ["--method", "vanilla"]
    p = run_cli(*base, *args, check=False, timeout=300)
    err = p.stderr.strip()
    assert p.returncode == 2, f"{case}: exit {p.returncode}\n{err[-2000:]}"
    assert "Traceback" not in err, f"{case}: traceback\n{err[-2000:]}"
    assert err.startswith("mimkd: error:") and needle in err, f"{case}: {err}"
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("last.pt"))


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from mimkd.checkpoint import atomic_save
    path = sys.argv[1]
    i = 0
    while True:  # 16 MB per write: long enough to be interrupted inside one
        i += 1
        atomic_save({"i": i, "payload": torch.full((4_000_000,), float(i))}, path)
        print(i, flush=True)
    """
)


@pytest.mark.parametrize("trial", range(4))
def test_sigkill_during_checkpoint_write_keeps_previous_intact(tmp_path, trial):
    path = tmp_path / "last.pt"
    atomic_save({"i": 0, "payload": torch.zeros(4_000_000)}, path)
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # at least one complete write
    time.sleep(random.Random(trial).uniform(0.0, 0.3))  # then somewhere inside a later write
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ck = load_checkpoint(path)  # the last complete write, whole: every element holds its own counter
    assert ck["i"] >= 1 and ck["payload"].numel() == 4_000_000
    assert bool(ck["payload"].eq(float(ck["i"])).all())
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    assert all(n.startswith(".last.pt.") and n.endswith(".tmp") for n in leftovers)


@needs_fmnist
def test_non_finite_loss_stop_keeps_last_good_checkpoint_or_skips_and_counts(tmp_path):
    env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    args = ["train", "--model", "foreign_models:nan_every_third", *SMALL_RUN, "--epochs", "1"]
    args += ["--set", "train.max_steps_per_epoch=8", "--set", "train.checkpoint_every_steps=1"]
    p = run_cli(*args, "--out", str(tmp_path), "--name", "stop", check=False, env_extra=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "non-finite loss at epoch 1, step 3: term(s) ce" in p.stderr and "last.pt" in p.stderr
    ck = load_checkpoint(tmp_path / "stop" / "last.pt")  # the state after the 2 good steps
    assert ck["step"] == 2 and all(
        bool(torch.isfinite(v).all()) for v in ck["model"].values() if v.is_floating_point()
    )
    p = run_cli(
        *args, "--set", "train.on_nonfinite=skip", "--out", str(tmp_path), "--name", "skip", env_extra=env
    )
    s = json.loads((tmp_path / "skip" / "summary.json").read_text())
    assert s["status"] == "finished" and s["skipped_batches"] == 2  # steps 3 and 6 of 8 refused, counted


@needs_fmnist
def test_full_disk_is_refused_before_training(tmp_path):
    full = str(Path(__file__).parent / "full_disk")  # a sitecustomize that makes the disk report 1 MiB free
    env = {"PYTHONPATH": os.pathsep.join([full, os.environ.get("PYTHONPATH", "")])}
    p = run_cli(
        "train", "--model", "conv4mp_w32", *SMALL_RUN, *RUN, "--out", str(tmp_path), "--name", "r",
        check=False, env_extra=env,
    )  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "not enough free disk space" in p.stderr and "MiB needed" in p.stderr, p.stderr
    assert not (tmp_path / "r" / "last.pt").exists() and not (tmp_path / "r" / "metrics.jsonl").exists()


def test_any_non_checkpoint_file_is_a_checkpoint_error(tmp_path):
    """Random bytes make torch's unpickler fail in many ways (IndexError, KeyError, UnicodeDecodeError as well
    as UnpicklingError): every one must reach the user as a CheckpointError naming the file."""
    from mimkd.errors import CheckpointError

    rng = random.Random(0)
    kinds = set()
    for i in range(60):
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        path = tmp_path / f"junk{i}.pt"
        path.write_bytes(b"\x80\x02" + payload if i % 3 == 0 else payload)
        with pytest.raises(CheckpointError, match=f"junk{i}.pt") as info:
            load_checkpoint(path)
        kinds.add(str(info.value).rsplit("(", 1)[-1][:12])
    assert len(kinds) > 1  # several different unpickler failures were exercised
