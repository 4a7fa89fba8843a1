"""Helpers shared by the tests: the real CLI in a subprocess, the small real-data run flags."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
