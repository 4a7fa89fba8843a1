"""Shared fixtures: real Fashion-MNIST runs small enough for the fast suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import FMNIST, SMALL_RUN, run_cli


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A cnn_teacher trained for 2 epochs on 2 % of Fashion-MNIST: a real (weak) teacher checkpoint."""
    if not FMNIST.exists():
        pytest.skip("Fashion-MNIST not installed")
    out = tmp_path_factory.mktemp("teacher")
    run_cli("train", "--model", "cnn_teacher", *SMALL_RUN, "--epochs", "2", "--out", str(out), "--name", "t")
    return out / "t" / "last.pt"
