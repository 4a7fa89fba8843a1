"""Single-input CPU inference latency: what a student costs on a small device.

:func:`measure_latency` times ``model(x)`` for one image (batch 1) on the CPU in inference mode, after
warm-up calls, and reports the median (and spread) of many timed calls, with a given number of threads. The
model is copied to the CPU in eval mode, so a training model is left untouched. The number is a property of
this machine: compare latencies measured on one machine only.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
import torch.nn as nn

__all__ = ["measure_latency", "latency_profile"]


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    threads: int | None = 1,
    runs: int = 50,
    warmup: int = 5,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Median / p90 / min milliseconds of one forward of ``model`` on a ``(1, *input_shape)`` CPU input.

    ``threads``: intra-op threads for the measurement (None: the current setting); restored afterwards.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    net = _bare_copy(model)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=fmt)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    times = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                net(x)
            for _ in range(runs):
                t0 = time.perf_counter()
                net(x)
                times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(before)
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, int(0.9 * len(times)))],
        "min_ms": times[0],
        "runs": runs,
        "threads": threads if threads is not None else before,
        "batch": 1,
    }


def _bare_copy(model: nn.Module) -> nn.Module:
    """An eval-mode CPU copy of ``model`` without the hooks a distiller attached (FeatureTap, DCM heads):
    the latency is the network's alone, and the hooks' bookkeeping would fail under inference mode."""
    net = copy.deepcopy(model).cpu().eval()
    for m in net.modules():
        for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            getattr(m, hooks, {}).clear()
        for extra in (
            "_forward_hooks_with_kwargs",
            "_forward_hooks_always_called",
            "_forward_pre_hooks_with_kwargs",
        ):
            getattr(m, extra, {}).clear()
    return net


def latency_profile(
    model: nn.Module, input_shape: tuple[int, ...], runs: int = 50, warmup: int = 5
) -> dict[str, dict[str, Any]]:
    """Latency with one thread (``"1_thread"``) and with every thread torch uses here (``"all_threads"``)."""
    every = max(1, torch.get_num_threads())
    out = {"1_thread": measure_latency(model, input_shape, 1, runs, warmup)}
    out["all_threads"] = (
        measure_latency(model, input_shape, every, runs, warmup) if every > 1 else dict(out["1_thread"])
    )
    return out
