"""Exact resume: a real CLI run killed with SIGKILL and resumed ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import SMALL_RUN, kill_mid_run, needs_fmnist, run_cli

pytestmark = needs_fmnist

ARGS = [
    "train",
    "--model",
    "conv4mp_w32",
    *SMALL_RUN,
    "--epochs",
    "2",
    "--seed",
    "3",
    "--set",
    "train.checkpoint_every_steps=4",
]


def _final(run_dir):
    return torch.load(run_dir / "last.pt", weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    run_cli(*ARGS, "--out", str(out), "--name", "ref")
    return out / "ref"


def _check_identical(reference, resumed):
    a, b = _final(reference), _final(resumed)
    assert a["epoch"] == b["epoch"] == 2
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), f"{k} differs after resume"
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    ra = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rb] == [0, 1]
    for x, y in zip(ra, rb):
        assert x["test.top1"] == y["test.top1"] and x["loss.total"] == pytest.approx(
            y["loss.total"], abs=1e-12
        )


def _kill_and_resume(tmp_path, reference, trial: int) -> None:
    name = f"killed{trial}"
    train_seconds = json.loads((reference / "summary.json").read_text())["wall_time_s"]
    # within the first half of the reference's training time: the reference runs first, cold (oneDNN kernel
    # set-up), so a later identical run can be noticeably faster; a bound of 0.8x let a fast run finish first
    reached = kill_mid_run(ARGS, tmp_path, name, seed=trial, max_delay=0.5 * train_seconds)
    assert reached < 2000, "the run finished before it was killed; nothing was tested"
    run_cli(*ARGS, "--out", str(tmp_path), "--name", name, "--resume")
    _check_identical(reference, tmp_path / name)


def test_sigkill_then_resume_is_bit_identical(tmp_path, reference):
    _kill_and_resume(tmp_path, reference, trial=0)


@pytest.mark.slow
@pytest.mark.parametrize("trial", [1, 2, 3, 4])
def test_sigkill_then_resume_is_bit_identical_more_trials(tmp_path, reference, trial):
    _kill_and_resume(tmp_path, reference, trial)


def test_resume_with_changed_config_is_refused(tmp_path, reference):
    import shutil

    shutil.copytree(reference, tmp_path / "ref")
    p = run_cli(*ARGS, "--out", str(tmp_path), "--name", "ref", "--resume", "--lr", "0.3", check=False)
    assert p.returncode == 2 and "configuration differs" in p.stderr and "optim.lr" in p.stderr


def test_sigkill_during_a_checkpoint_write_then_resume(tmp_path, reference):
    """Kill the real CLI the moment a checkpoint's temporary file appears (inside atomic_save): last.pt still
    loads (the previous checkpoint), and the resumed run ends bit-identical to the uninterrupted one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from mimkd.checkpoint import load_checkpoint

    name, run_dir = "killed_in_write", tmp_path / "killed_in_write"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mimkd", *ARGS, "--out", str(tmp_path), "--name", name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    hit, deadline = False, time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if (run_dir / "last.pt").exists() and any(run_dir.glob(".last.pt.*.tmp")):
            os.kill(proc.pid, signal.SIGKILL)  # a later checkpoint is being written right now
            hit = True
            break
        time.sleep(0.0005)
    proc.wait()
    if not hit:
        pytest.skip("the run never showed a checkpoint write in progress to kill (writes too fast here)")
    ck = load_checkpoint(run_dir / "last.pt")  # the previous, complete checkpoint
    assert ck["epoch"] * 1000 + ck["step"] < 2000
    run_cli(*ARGS, "--out", str(tmp_path), "--name", name, "--resume")
    _check_identical(reference, run_dir)
    assert not list(run_dir.glob(".*.tmp"))  # the cut-short write was cleaned up
