"""Optimiser and learning-rate schedule from a resolved :class:`~mimkd.config.OptimConfig`.

The schedule is a pure function of (epoch, step): nothing to save or restore, so a resumed run gets exactly
the learning rate an uninterrupted one would. ``step`` follows RepDistiller (docs/methods/vanilla.md):
epoch ``e`` (0-based) uses ``lr · γ^{#milestones ≤ e}``, i.e. the decay takes effect after ``m`` completed
epochs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from mimkd.config import OptimConfig

__all__ = ["build_optimizer", "lr_at", "param_groups", "set_lr"]


def param_groups(
    named: Iterable[tuple[str, torch.nn.Parameter]], scales: dict[str, float]
) -> list[torch.nn.Parameter] | list[dict]:
    """The parameters as optimiser groups by learning-rate scale (the first matching name prefix of
    ``scales``, else 1); a plain list when there are no scales (one group, as before scales existed)."""
    named = [(n, p) for n, p in named if p.requires_grad]
    if not scales:
        return [p for _, p in named]
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, p in named:
        scale = next((float(v) for k, v in scales.items() if name.startswith(k)), 1.0)
        groups.setdefault(scale, []).append(p)
    return [{"params": ps, "lr_scale": s} for s, ps in groups.items()]


def build_optimizer(
    cfg: OptimConfig, params: Iterable[torch.nn.Parameter] | list[dict], *, fused: bool = False
) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay on every trainable parameter, as RepDistiller) or AdamW.

    ``fused=True`` picks PyTorch's fused implementation, which can skip an update on the device
    (``found_inf``, used by the deferred non-finite check of :class:`~mimkd.engine.step.TrainStep`).
    ``params`` may be groups from :func:`param_groups` (their ``lr_scale`` is applied by :func:`set_lr`).
    """
    params = [p for p in params if isinstance(p, dict) or p.requires_grad]
    extra = {"fused": True} if fused else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum or 0.0,
            nesterov=bool(cfg.nesterov),
            weight_decay=cfg.weight_decay or 0.0,
            **extra,
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay or 0.0, **extra)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def lr_at(cfg: OptimConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate for ``step`` (0-based) of ``epoch`` (0-based)."""
    base = float(cfg.lr)
    warm = cfg.warmup_epochs or 0
    progress = epoch + step / max(steps_per_epoch, 1)
    if warm and progress < warm:
        return base * (progress + 1.0 / max(steps_per_epoch, 1)) / warm
    if cfg.schedule == "step":
        return base * (cfg.gamma ** sum(1 for m in (cfg.milestones or []) if epoch >= m))
    if cfg.schedule == "cosine":
        total = cfg.epochs - warm
        t = min(max(progress - warm, 0.0) / max(total, 1e-12), 1.0)
        return base * 0.5 * (1.0 + math.cos(math.pi * t))
    return base


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
