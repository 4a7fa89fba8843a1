"""Helpers shared by the tests: the real CLI in a subprocess, the small real-data run flags."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
needs_fmnist = pytest.mark.skipif(
    not FMNIST.exists(), reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)"
)

# A tiny but real run: 2 % of Fashion-MNIST (1200 images), 10 % of its test set.
SMALL_RUN = [
    "--data",
    "fashion_mnist",
    "--train-fraction",
    "0.02",
    "--set",
    "data.test_fraction=0.1",
    "--batch-size",
    "32",
    "--threads",
    "2",
    "--no-progress",
]


def run_cli(*args: str, check: bool = True, timeout: float = 600, env_extra: dict | None = None):
    """Run the real ``mimkd`` CLI in a subprocess; returns the CompletedProcess."""
    env = {**os.environ, **(env_extra or {})}
    env.pop("MIMKD_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mimkd", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"mimkd {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def kill_mid_run(args: list[str], out, name: str, seed: int, max_delay: float = 2.0) -> int:
    """Start the run, SIGKILL it at a random moment within ``max_delay`` s after its first checkpoint; return
    the position (epoch * 1000 + step) of the checkpoint it left."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "mimkd", *args, "--out", str(out), "--name", name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    ckpt = out / name / "last.pt"
    deadline = time.time() + 300
    while not ckpt.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before its first checkpoint: {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("no checkpoint within 300 s")
        time.sleep(0.05)
    time.sleep(random.Random(seed).uniform(0.0, max_delay))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ck = torch.load(ckpt, weights_only=True)
    return ck["epoch"] * 1000 + ck["step"]
