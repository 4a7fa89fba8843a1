"""The progress bar's whole-run ETA (mimkd.engine.loop): the arithmetic, and a real run's captured bar.

The ETA is the steps left in the run (this stage's epoch, its later epochs, every later stage) times the
seconds per step measured over the steps this process ran; after a resume it counts from the resumed position.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest
import torch

from mimkd.engine.loop import RunClock, StagePlan, format_eta, run_eta, steps_left

from helpers import needs_fmnist

PLAN = [StagePlan("hint", 2, 10), StagePlan("main", 3, 10)]  # an init stage of 2 epochs, then 3 epochs


@pytest.mark.parametrize(
    ("stage", "epoch", "step", "left"),
    [
        (0, 0, 0, 50),  # the whole run
        (0, 1, 4, 6 + 30),  # the rest of the stage's last epoch, then all of the main stage
        (1, 0, 0, 30),
        (1, 1, 7, 3 + 10),  # resumed mid-epoch in the main stage
        (1, 2, 10, 0),  # the end
        (2, 0, 0, 0),  # past the end
    ],
)
def test_steps_left_counts_this_epoch_later_epochs_and_later_stages(stage, epoch, step, left):
    assert steps_left(PLAN, stage, epoch, step) == left


def test_run_eta_is_steps_left_times_seconds_per_step():
    assert run_eta(10.0, 20, 36) == pytest.approx(18.0)  # 0.5 s per step
    assert run_eta(10.0, 20, 0) == 0.0
    assert run_eta(0.0, 0, 36) is None  # no step measured yet
    assert [format_eta(s) for s in (0, 59.6, 75, 3725, None)] == ["00:00", "01:00", "01:15", "1:02:05", "?"]


def test_clock_after_a_resume_counts_from_the_resumed_position_at_this_process_rate():
    clock = RunClock(PLAN)
    assert clock.eta(1, 1, 7) is None  # not started
    clock.start()
    clock.started = (
        time.time() - 4.0
    )  # this process: 8 steps in 4 s (the steps before the resume do not count)
    for _ in range(8):
        clock.tick()
    assert clock.eta(1, 1, 7) == pytest.approx(13 * 0.5, rel=0.05)
    assert clock.eta(0, 0, 0) == pytest.approx(50 * 0.5, rel=0.05)


ETA = re.compile(r"(init hint \d/\d|epoch \d/\d):.*?run ETA (\d+(?::\d\d)+)")


def _seconds(text: str) -> int:
    total = 0
    for part in text.split(":"):
        total = total * 60 + int(part)
    return total


@needs_fmnist
def test_a_real_run_shows_the_run_eta_in_every_stage(tmp_path):
    from mimkd.models import build_network

    torch.manual_seed(11)
    teacher = tmp_path / "teacher.pt"
    torch.save({"model": build_network("cnn_teacher", 10, 1).state_dict(), "arch": "cnn_teacher"}, teacher)
    args = [
        "distill", "--teacher", str(teacher), "--student", "conv4mp_w32", "--method", "fitnets",
        "--set", "method.two_stage=true", "--set", "method.init_epochs=1",
        "--data", "fashion_mnist", "--train-fraction", "0.02", "--set", "data.test_fraction=0.05",
        "--batch-size", "32", "--threads", "1", "--epochs", "2", "--set", "train.max_steps_per_epoch=20",
        "--set", "train.progress=true", "--set", "train.measure_latency=false",
        "--set", "train.eval_teacher=false", "--out", str(tmp_path), "--name", "eta",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_MININTERVAL": "0"}  # draw the bar on every update
    env.pop("MIMKD_DEBUG", None)
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "mimkd", *args], capture_output=True, text=True, timeout=600, env=env
    )
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = ETA.findall(proc.stderr.replace("\r", "\n"))
    bars = {desc for desc, _ in shown}
    assert {"init hint 1/1", "epoch 1/2", "epoch 2/2"} <= bars, proc.stderr[-2000:]
    seconds = [_seconds(eta) for _, eta in shown]
    assert max(seconds) <= 3 * wall + 5  # a whole-run estimate, not a wild one
    first_init = next(s for (desc, _), s in zip(shown, seconds) if desc.startswith("init"))
    assert seconds[-1] <= first_init  # it counts down across the stages
    assert all("img/s=" in line for line in proc.stderr.replace("\r", "\n").splitlines() if "run ETA" in line)
