"""Run directories through the real CLI: one process per run (OS lock), --overwrite that cannot lose the old
run, the teacher's identity on --resume and in a sweep, models probed against the data before anything is
written, a disk that really fills up (a tmpfs) while a checkpoint is written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from mimkd.checkpoint import load_checkpoint

from helpers import SMALL_RUN, needs_fmnist, run_cli

pytestmark = needs_fmnist

SHORT = ["--epochs", "1", "--set", "train.max_steps_per_epoch=3", "--set", "train.measure_latency=false"]
# about 10 s per epoch on 2 cores: long enough for a second process to meet the first one
SLOW = [
    "--data", "fashion_mnist", "--train-fraction", "0.2", "--set", "data.test_fraction=0.1",
    "--batch-size", "32", "--threads", "1", "--no-progress", "--set", "train.measure_latency=false",
]  # fmt: skip


def _popen(args: list[str], env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, **(env_extra or {})}
    env.pop("MIMKD_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "mimkd", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended early: {proc.stderr.read()[-2000:]}"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def _one_error_line(p, needle: str) -> str:
    err = p.stderr.strip()
    assert p.returncode == 2, f"exit {p.returncode}: {err[-2000:]}"
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("mimkd: error:")]
    assert len(errors) == 1 and needle in errors[0], err
    return errors[0]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _distill(teacher: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(teacher), "--student", "conv4mp_w32", "--method", "kd",
            *SMALL_RUN, "--out", str(out), "--name", name, *extra]  # fmt: skip


# -- one process per run directory ---------------------------------------------------------------------
def test_second_process_on_a_running_run_is_refused_naming_the_holder(tmp_path):
    args = ["train", "--model", "conv4mp_w32", *SLOW, "--epochs", "2", "--out", str(tmp_path), "--name", "r"]
    first = _popen(args)
    _wait_for(tmp_path / "r" / "config.yaml", first)
    second = run_cli(*args, "--resume", check=False)
    line = _one_error_line(second, "in use by another mimkd process")
    assert f"PID {first.pid}" in line and str(tmp_path / "r") in line
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    assert [r["epoch"] for r in _records(tmp_path / "r")] == [0, 1]  # every epoch once
    load_checkpoint(tmp_path / "r" / "last.pt")


def test_a_killed_runs_lock_never_blocks_its_resume(tmp_path):
    args = ["train", "--model", "conv4mp_w32", *SLOW, "--epochs", "2", "--out", str(tmp_path), "--name", "r"]
    args += ["--set", "train.checkpoint_every_steps=20"]
    proc = _popen(args)
    _wait_for(tmp_path / "r" / "last.pt", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / ".r.lock").exists()  # the file stays; the kernel dropped the lock with the process
    run_cli(*args, "--resume")
    assert [r["epoch"] for r in _records(tmp_path / "r")] == [0, 1]


_TEACHER_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from mimkd.demo import _train_teacher
    ckpt, summary = _train_teacher(Path(sys.argv[1]), False, epochs=1, fraction=0.05)
    print("top1", summary["last"]["top1"])
    """
)


def test_two_demos_train_the_cached_teacher_once(tmp_path):
    procs = [
        subprocess.Popen([sys.executable, "-c", _TEACHER_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    text = "".join(o[0] for o in outs)
    assert text.count("teacher: training") == 1 and text.count("teacher: reusing") == 1, text
    (teacher_dir,) = [d for d in (tmp_path / "teachers").iterdir() if d.is_dir()]
    assert len(_records(teacher_dir)) == 1
    tops = {line for line in text.splitlines() if line.startswith("top1")}
    assert len(tops) == 1  # both read the same teacher


# -- --resume and --overwrite ---------------------------------------------------------------------------
def test_resume_with_nothing_to_resume_is_refused(tmp_path):
    p = run_cli("train", "--model", "conv4mp_w32", *SMALL_RUN, *SHORT, "--out", str(tmp_path), "--name",
                "none", "--resume", check=False)  # fmt: skip
    _one_error_line(p, "nothing to resume")
    assert not (tmp_path / "none").exists()


def _finished_kd(tiny_teacher: Path, out: Path) -> tuple[dict, bytes]:
    run_cli(*_distill(tiny_teacher, out, "k", *SHORT))
    return json.loads((out / "k" / "summary.json").read_text()), (out / "k" / "last.pt").read_bytes()


def _same_old_run(out: Path, summary: dict, last: bytes) -> None:
    assert json.loads((out / "k" / "summary.json").read_text()) == summary
    assert (out / "k" / "last.pt").read_bytes() == last
    load_checkpoint(out / "k" / "best.pt")
    assert len(_records(out / "k")) == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".overwritten")]


def test_failed_overwrite_keeps_the_old_run(tiny_teacher, tmp_path):
    summary, last = _finished_kd(tiny_teacher, tmp_path)
    # refused by the probe before anything is touched
    p = run_cli(*_distill(tiny_teacher, tmp_path, "k", *SHORT, "--method", "mimkd", "--batch-size", "1",
                          "--overwrite"), check=False)  # fmt: skip
    _one_error_line(p, "batch")
    _same_old_run(tmp_path, summary, last)
    # fails after the old run was moved aside (the disk reports 1 MiB free): put back
    full = str(Path(__file__).parent / "full_disk")
    env = {"PYTHONPATH": os.pathsep.join([full, os.environ.get("PYTHONPATH", "")])}
    p = run_cli(*_distill(tiny_teacher, tmp_path, "k", *SHORT, "--overwrite"), check=False, env_extra=env)
    line = _one_error_line(p, "not enough free disk space")
    assert "previous run" in line and "kept" in line
    _same_old_run(tmp_path, summary, last)


def test_overwrite_replaces_the_run_once_the_new_one_finishes(tiny_teacher, tmp_path):
    summary, last = _finished_kd(tiny_teacher, tmp_path)
    run_cli(*_distill(tiny_teacher, tmp_path, "k", *SHORT, "--seed", "1", "--overwrite"))
    new = json.loads((tmp_path / "k" / "summary.json").read_text())
    assert new["status"] == "finished" and (tmp_path / "k" / "last.pt").read_bytes() != last
    assert load_checkpoint(tmp_path / "k" / "last.pt")["config"]["seed"] == 1
    assert not (tmp_path / ".k.overwritten").exists() and len(_records(tmp_path / "k")) == 1


def test_an_overwrite_killed_before_its_first_checkpoint_is_undone(tiny_teacher, tmp_path):
    summary, last = _finished_kd(tiny_teacher, tmp_path)
    no_ckpt = ["--set", "train.checkpoint_every_steps=9999"]
    args = _distill(tiny_teacher, tmp_path, "k", "--epochs", "1", *no_ckpt)
    args[args.index("--train-fraction") + 1] = "0.3"  # an epoch of several seconds, no checkpoint inside it
    proc = _popen([*args, "--overwrite"])
    _wait_for(tmp_path / ".k.overwritten", proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "k" / "last.pt").exists()
    p = run_cli(*_distill(tiny_teacher, tmp_path, "k", *SHORT), check=False)  # the next look puts it back
    assert "restored" in p.stderr
    _one_error_line(p, "already holds a run")
    _same_old_run(tmp_path, summary, last)


# -- the teacher's identity -----------------------------------------------------------------------------
def _other_teacher(tmp_path: Path) -> Path:
    run_cli("train", "--model", "cnn_teacher", *SMALL_RUN, "--epochs", "1", "--seed", "7",
            "--set", "train.max_steps_per_epoch=2", "--out", str(tmp_path / "t2"), "--name", "t")  # fmt: skip
    return tmp_path / "t2" / "t" / "last.pt"


def test_resume_refuses_a_replaced_teacher_naming_both_hashes(tiny_teacher, tmp_path):
    teacher = tmp_path / "teacher.pt"
    shutil.copy(tiny_teacher, teacher)
    run_cli(*_distill(teacher, tmp_path, "k", *SHORT))
    ck = load_checkpoint(tmp_path / "k" / "last.pt")
    recorded = ck["teacher_identity"]
    assert recorded["weights_sha256"] and recorded["file_sha256"]
    summary = json.loads((tmp_path / "k" / "summary.json").read_text())
    assert summary["teacher_identity"] == recorded
    shutil.copy(_other_teacher(tmp_path), teacher)  # another teacher at the same path
    p = run_cli(*_distill(teacher, tmp_path, "k", *SHORT, "--resume"), check=False)
    line = _one_error_line(p, "the teacher changed")
    assert recorded["weights_sha256"][:12] in line
    from mimkd.engine.identity import file_identity

    assert file_identity(teacher)["weights_sha256"][:12] in line
    shutil.copy(tiny_teacher, teacher)  # the original back: the finished run resumes (nothing to do)
    run_cli(*_distill(teacher, tmp_path, "k", *SHORT, "--resume"))


def test_sweep_read_back_refuses_a_finished_run_whose_teacher_changed(tmp_path):
    from test_sweep import TINY_BASE

    study = {
        "study": "tiny", "seeds": 1, "base": {**TINY_BASE, "optim": {**TINY_BASE["optim"], "epochs": 1}},
        "teachers": {"t": {"arch": "conv4mp_w32", "train": {"optim": {"epochs": 1}}}},
        "pairs": [{"teacher": "t", "student": "conv4mp"}], "methods": {"kd": {}},
    }  # fmt: skip
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "out"
    run_cli("sweep", str(path), "--out", str(out))
    (teacher,) = (out / "teachers").rglob("last.pt")
    ck = load_checkpoint(teacher)
    ck["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in ck["model"].items()}
    torch.save(ck, teacher)  # the teacher run's weights replaced in place
    p = run_cli("sweep", str(path), "--out", str(out), check=False)
    _one_error_line(p, "the teacher changed")


# -- the model against the data, before anything is written ------------------------------------------
FACTORIES = textwrap.dedent(
    """
    import torch.nn as nn

    def boom(num_classes=10, in_channels=1):
        raise RuntimeError("factory exploded")

    def wrong_input(num_classes=10, in_channels=1):
        return nn.Sequential(nn.Flatten(), nn.Linear(100, num_classes))

    def five_classes(num_classes=10, in_channels=1):
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 5))
    """
)


@pytest.mark.parametrize(
    ("factory", "needle"),
    [
        ("boom", "the factory raised RuntimeError: factory exploded"),
        ("wrong_input", "fails on this data's images (1-channel 28×28 images, 10 classes)"),
        ("five_classes", "outputs shape (8, 5) for a batch of 8, but the data has 10 classes"),
    ],
)
def test_a_model_that_does_not_fit_the_data_is_one_line_and_writes_nothing(tmp_path, factory, needle):
    (tmp_path / "my_models.py").write_text(FACTORIES)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "runs"
    p = run_cli("train", "--model", f"my_models:{factory}", *SMALL_RUN, *SHORT, "--out", str(out),
                check=False, env_extra=env)  # fmt: skip
    _one_error_line(p, needle)
    assert not out.exists() or not any(out.iterdir())


def test_teacher_trained_on_another_input_size_is_refused_unless_allowed(tmp_path):
    run_cli("train", "--model", "cnn_teacher", *SMALL_RUN, *SHORT, "--image-size", "32", "--out",
            str(tmp_path), "--name", "t32")  # fmt: skip
    teacher = tmp_path / "t32" / "last.pt"
    p = run_cli(*_distill(teacher, tmp_path, "k", *SHORT), check=False)
    _one_error_line(p, "was trained on 1×32×32 images, this run's data is 1×28×28")
    assert not (tmp_path / "k").exists()
    run_cli(*_distill(teacher, tmp_path, "k", *SHORT, "--set", "teacher.check_input=false"))


# -- a disk that fills up while the run writes -----------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:  # fmt: skip
        pytest.skip("needs root to mount a small tmpfs")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_a_checkpoint_is_one_line_and_resume_continues(small_disk):
    args = ["train", "--model", "conv4mp_w32", *SLOW, "--epochs", "2", "--out", str(small_disk), "--name",
            "r", "--set", "train.checkpoint_every_steps=5", "--set", "train.tensorboard=false"]  # fmt: skip
    proc = _popen(args)
    _wait_for(small_disk / "r" / "last.pt", proc)
    fd = os.open(small_disk / "ballast", os.O_WRONLY | os.O_CREAT)
    for chunk in (1 << 16, 1):  # fill the disk to the last byte
        try:
            while True:
                os.write(fd, b"\0" * chunk)
        except OSError:
            pass
    os.close(fd)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 2, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("mimkd: error:")]
    assert len(errors) == 1 and "disk is full" in errors[0] and "--resume" in errors[0], err
    assert "MiB" in errors[0]
    ck = load_checkpoint(small_disk / "r" / "last.pt")  # the last complete checkpoint, whole
    assert ck["step"] > 0 or ck["epoch"] > 0
    (small_disk / "ballast").unlink()
    run_cli(*args, "--resume")
    assert [r["epoch"] for r in _records(small_disk / "r")] == [0, 1]
