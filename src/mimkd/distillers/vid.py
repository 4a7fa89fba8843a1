"""``vid``: Variational Information Distillation (Ahn et al., CVPR 2019; docs/methods/vid.md).

For every position-paired ``(feat_s[k], feat_t[k])`` of the stage outputs ``feat[1:-1]`` (stem excluded; the
lists are zipped, so the longer one is truncated) the student map goes through a regressor

    conv1×1(C_s→C_t) – ReLU – conv1×1(C_t→C_t) – ReLU – conv1×1(C_t→C_t)     (no biases)

that predicts the mean ``μ`` of a Gaussian over the teacher map ``t`` with a learned per-channel variance
``σ² = softplus(s) + 1e-5`` (``s`` initialised so that ``σ² = 5.0``). The loss is the Gaussian negative
log-likelihood without its constant, ``mean(0.5·((μ − t)²/σ² + log σ²))`` over batch, channels and locations,
summed over the pairs. When the spatial sizes differ the larger map is adaptive-average-pooled to the smaller
one first (the student map before the regressor). Weights: ``γ = 1, α = 0, β = 1`` (RepDistiller).

At initialisation a zero regressor output and a zero target give ``0.5·ln 5 = 0.8047190`` per pair (σ² = 5).

Speed: the loss is reduced per channel first (``Σ_{b,h,w}(μ − t)²`` by one norm over the map, with a one-pass
custom backward), so the ``B×C×H×W`` maps are read about three times per step instead of about eight.

Deviation from RepDistiller: none in the loss. Pooling uses the full ``H×W`` of the smaller map (RepDistiller
pools to ``H×H``, the same thing for the square CIFAR maps).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from mimkd.errors import MethodError

from .base import DistillContext
from .feature_base import BaselineOptions, FeatureDistiller, FeatureLists, index_pairs, pool_to_common
from .registry import register_distiller

__all__ = ["VID", "VIDHead", "VIDOptions", "vid_log_scale_init", "vid_loss", "vid_variance"]


def vid_variance(log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-channel variance ``σ² = softplus(s) + eps``."""
    return F.softplus(log_scale) + eps


def vid_log_scale_init(variance: float = 5.0, eps: float = 1e-5) -> float:
    """The ``s`` with ``softplus(s) + eps = variance`` (``s = log(exp(variance − eps) − 1)``)."""
    if variance <= eps:
        raise MethodError(f"vid: the initial variance must exceed eps={eps}, got {variance}")
    return math.log(math.expm1(variance - eps))


class _ChannelSquaredError(torch.autograd.Function):
    """``Σ_{b,h,w} (mean − target)²`` per channel (``(C,)``, at least float32), with a one-pass backward.

    Autograd of ``(mean − target).square().sum(dims)`` makes about twice the passes over the ``B×C×H×W``
    maps; this keeps the difference and returns ``2·g_c·(mean − target)`` (and its negation for a target that
    requires a gradient).
    """

    @staticmethod
    def forward(ctx, mean: Tensor, target: Tensor) -> Tensor:
        diff = mean - target
        ctx.save_for_backward(diff)
        dims = [0, *range(2, diff.dim())]
        acc = torch.promote_types(diff.dtype, torch.float32)
        return torch.linalg.vector_norm(diff, dim=dims, dtype=acc).square()

    @staticmethod
    def backward(ctx, grad: Tensor):
        (diff,) = ctx.saved_tensors
        scale = (2.0 * grad).view(1, -1, *([1] * (diff.dim() - 2)))
        g = (diff * scale).to(diff.dtype)
        return (
            g if ctx.needs_input_grad[0] else None,
            -g if ctx.needs_input_grad[1] else None,
        )


def vid_loss(mean: Tensor, target: Tensor, log_scale: Tensor, eps: float = 1e-5) -> Tensor:
    """VID's Gaussian negative log-likelihood (constant dropped), averaged over every element.

    ``mean`` and ``target``: ``B×C×H×W`` (or ``B×C``); ``log_scale``: ``(C,)``, mapped to the per-channel
    variance ``σ² = softplus(log_scale) + eps``. Returns ``mean(0.5·((mean − target)²/σ² + log σ²))``,
    computed per channel (each has ``n = B·H·W`` elements): ``0.5·mean_c(SSE_c/(n·σ²_c) + log σ²_c)``.
    """
    if mean.shape != target.shape:
        raise MethodError(
            f"vid_loss: the prediction {tuple(mean.shape)} and the target {tuple(target.shape)} "
            "differ in shape"
        )
    if mean.dim() < 2 or log_scale.dim() != 1 or log_scale.numel() != mean.shape[1]:
        raise MethodError(
            f"vid_loss: log_scale must have one entry per channel of the B×C(×H×W) prediction "
            f"{tuple(mean.shape)}, got shape {tuple(log_scale.shape)}"
        )
    per_channel = mean.numel() // mean.shape[1]
    sse = _ChannelSquaredError.apply(mean, target)  # (C,)
    var = vid_variance(log_scale.to(sse.dtype), eps)
    return 0.5 * (sse / (per_channel * var) + torch.log(var)).mean()


def _conv1x1(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)


class VIDHead(nn.Module):
    """One pair's regressor (student map → predicted teacher mean) and per-channel variance parameter."""

    def __init__(self, c_s: int, c_t: int, init_variance: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = float(eps)
        self.regressor = nn.Sequential(
            _conv1x1(c_s, c_t), nn.ReLU(), _conv1x1(c_t, c_t), nn.ReLU(), _conv1x1(c_t, c_t)
        )
        self.log_scale = nn.Parameter(torch.full((c_t,), vid_log_scale_init(init_variance, eps)))

    def variance(self) -> Tensor:
        return vid_variance(self.log_scale, self.eps)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        student, teacher = pool_to_common(student, teacher)
        return vid_loss(self.regressor(student), teacher, self.log_scale, self.eps)


class VIDOptions(BaselineOptions):
    """RepDistiller's ``-r 1 -a 0 -b 1`` and VIDLoss's ``init_pred_var = 5.0``, ``eps = 1e-5``."""

    weight: float = Field(1.0, ge=0.0)  # β
    init_variance: float = Field(5.0, gt=0.0)
    eps: float = Field(1e-5, gt=0.0)


@register_distiller("vid")
class VID(FeatureDistiller):
    """Variational information distillation on the position-paired ``feat[1:-1]`` maps."""

    Options = VIDOptions

    def points(self, s: FeatureLists, t: FeatureLists) -> tuple[list[str], list[str]]:
        self.pairs = index_pairs(t.maps, s.maps)  # (teacher point, student point)
        if not self.pairs:
            raise MethodError("vid: the teacher or the student has no stage output map (feat[1:-1] is empty)")
        return [p for _, p in self.pairs], [p for p, _ in self.pairs]

    def build_modules(self, context: DistillContext) -> None:
        o = self.options
        heads = []
        for t, s in self.pairs:
            ts, ss = self.t_specs[t], self.s_specs[s]
            if not (ts.is_map and ss.is_map):
                raise MethodError(f"vid: the paired points {s!r} (student) and {t!r} (teacher) must be maps")
            heads.append(VIDHead(ss.channels, ts.channels, o.init_variance, o.eps))
        self.heads = nn.ModuleList(heads)

    def method_loss(self, fs, ft, logits, t_logits, index):
        losses = [head(fs[s], ft[t]) for head, (t, s) in zip(self.heads, self.pairs)]
        return torch.stack(losses).sum()

    def describe(self) -> dict:
        info = super().describe()
        info["pairs"] = [
            {
                "teacher": t,
                "teacher_shape": list(self.t_specs[t].shape),
                "student": s,
                "student_shape": list(self.s_specs[s].shape),
            }
            for t, s in self.pairs
        ]
        return info
