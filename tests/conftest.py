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


def _needs_cuda(item: pytest.Item) -> bool:
    """A test that skips without a GPU (its skipif reason names CUDA) or runs on a "cuda" parameter."""
    for mark in item.iter_markers("skipif"):
        if "cuda" in str(mark.kwargs.get("reason", "")).lower():
            return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(v == "cuda" or str(v).startswith("cuda:") for v in params.values())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # `pytest -m cuda` selects the tests a GPU exercises (benchmarks/gpu_check.sh runs them)
    for item in items:
        if _needs_cuda(item):
            item.add_marker(pytest.mark.cuda)
