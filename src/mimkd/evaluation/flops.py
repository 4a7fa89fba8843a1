"""Parameter and FLOP counts (torch's own FlopCounterMode: 2 FLOPs per multiply-accumulate)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "count_parameters"]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_flops(fn, *inputs: torch.Tensor) -> int:
    """FLOPs of one call ``fn(*inputs)`` (a module or any callable), counted by ``FlopCounterMode``.

    Divide by the batch size of ``inputs`` for a per-image figure. Counts matmuls/convolutions (2 per MAC);
    element-wise work (BN, ReLU, pooling) is not counted, as in the usual conventions.
    """
    was = None
    if isinstance(fn, nn.Module):
        was = fn.training
        fn.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            fn(*inputs)
    finally:
        if was is not None:
            fn.train(was)
    return int(counter.get_total_flops())
