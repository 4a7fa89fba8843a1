"""``kdep``: knowledge distillation as efficient pre-training (He et al., CVPR 2022; supp. B).

See docs/methods/kdep.md.

A label-free pre-training of the student backbone from the teacher's penultimate features::

    L = w · MSE_mean(f_s, A(f_t))

``f_s`` = the student's **pre-ReLU** last-stage map, global-average-pooled (D_s-d); ``f_t`` = the teacher's
pre-ReLU last-stage map, pooled (d_t-d), teacher frozen and run without autograd. No labels, no logits, no CE
or KD term: the student's classifier receives no gradient (``mimkd finetune`` re-initialises it).

Alignment ``A`` (option ``alignment``; supplementary B.3):

* ``svd`` (default, the paper's KDEP): offline, the teacher runs once over the pre-training images (the
  trainer's :meth:`offline_pass`); ``μ`` = mean of the pooled features ``X``, ``V`` = the top-D_s right
  singular vectors of ``X − μ``; online ``A(f_t) = PTS((f_t − μ)·V)``.
* ``cs_var`` / ``cs_rand``: the D_s teacher channels of largest variance (offline) / D_s channels drawn with
  ``seed``; then PTS.
* ``interp``: nearest-neighbour interpolation along the channel axis (d_t → D_s); then PTS.
* ``conv1x1_post_relu`` / ``conv1x1_pre_relu``: a trainable 1×1 conv + BN maps the student's post-ReLU /
  pre-ReLU last map (before pooling) to d_t channels, compared after pooling with the teacher's pooled
  post-ReLU / pre-ReLU map.
* ``conv1x1_margin``: the pre-ReLU connector, the teacher target ``max(f_t, m)`` with Heo et al.'s per-channel
  margin ``m = E[f_t | f_t < 0]`` (measured offline) and the partial L2 (elements where the student is at or
  below a non-positive target are skipped).

``PTS(x) = sign(x)·|x/T|^{1/n}`` (``pts_temperature`` T = 0.1, ``pts_power`` n = 3, the released code).
Reading of the supplementary: "KDEP = SVD+PTS"; the alignment study (B.3) compares the variants as such, so
``pts`` applies to the non-parametric variants only (where it is the paper's addition on top of SVD);
the parametric variants are plain (their connector learns any scale) and ignore it (``describe()`` says so).

The alignment lives in buffers (``mean``/``proj``, ``channels``, ``margin``, and the ``ready`` flag): it is
part of the method state of every checkpoint and restored on resume. The offline pass also writes
``run_dir/kdep_alignment.pt`` (all d_t components, channel variances and margins), which another run reuses
with ``svd_file=PATH`` (the file or its run directory) instead of its own pass: the paper computes the SVD on
10 % of ImageNet and reuses it for the 100 % runs.

Loss weight ``w`` (``loss_weight``, default 1.0; supplementary Table S.3, chosen to match the supervised
loss scale): standard supervised R50→R18 20; MS R50→R18 3; SWSL R50→R18 1; MEAL V2 R50→R18 1;
Swin-B→R18 3; MS R50→MNV2 3. Schedule (B.1, not set here): SGD momentum 0.9, batch 512, lr 0.3 (R18) /
0.1 (MNV2), ÷10 at 1/3 and 2/3 of the epochs.

Deviations:

* Feature points: the zoo's ``preact`` of the last stage. A model that declares none (the small Fashion-MNIST
  CNNs, foreign models) falls back to its post-ReLU last map, with a warning and a note in ``describe()``;
  ``student_point`` / ``teacher_point`` name any other hook point (e.g. ``conv2.1``, the 1280-d pre-ReLU
  1×1 conv+BN of MobileNetV2 that the paper uses, where our zoo's last stage is the 160-channel bottleneck).
* D_s > d_t cannot be served by ``svd``/``cs_var``/``cs_rand`` (there are only d_t components/channels): a
  clear error suggests ``interp`` or a 1×1 conv variant instead of padding with zeros.
* The singular vectors are computed as eigenvectors of the float64 scatter matrix, with a fixed sign
  convention, and the margin is measured on the data (see :mod:`mimkd.distillers.kdep_align`).
* The partial L2 is averaged over all elements (like the MSE of the other variants), not summed.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from mimkd.errors import CheckpointError, MethodError, MimkdWarning
from mimkd.features import FeatureTap, feature_points_of

from .base import Capabilities, DistillContext, Distiller, MethodOptions, StepContext
from .kdep_align import (
    ALIGNMENT_FILE,
    FeatureStats,
    interp_channels,
    load_alignment,
    partial_l2,
    pool,
    pts,
    save_alignment,
    select_channels,
)
from .registry import register_distiller

__all__ = ["KDEP", "KDEPOptions", "ALIGNMENTS"]

Alignment = Literal[
    "svd", "cs_var", "cs_rand", "interp", "conv1x1_post_relu", "conv1x1_pre_relu", "conv1x1_margin"
]
ALIGNMENTS: tuple[str, ...] = get_args(Alignment)
PARAMETRIC = frozenset({"conv1x1_post_relu", "conv1x1_pre_relu", "conv1x1_margin"})
OFFLINE = frozenset({"svd", "cs_var", "conv1x1_margin"})  # need the teacher's statistics first


class KDEPOptions(MethodOptions):
    loss_weight: float = Field(1.0, ge=0.0)  # w (supplementary Table S.3)
    alignment: Alignment = "svd"
    pts: bool = True  # power temperature scaling of the aligned target (non-parametric variants)
    pts_temperature: float = Field(0.1, gt=0.0)  # T
    pts_power: float = Field(3.0, gt=0.0)  # n
    svd_file: str | None = None  # a kdep_alignment.pt (or its run directory) to reuse instead of a pass
    seed: int = 0  # the channels of cs_rand
    student_point: str | None = None  # None: the last stage's pre-ReLU map (post-ReLU for conv1x1_post_relu)
    teacher_point: str | None = None


@register_distiller("kdep")
class KDEP(Distiller):
    """KDEP pre-training: ``w · MSE(pool(pre-ReLU student), A(pool(pre-ReLU teacher)))``."""

    Options = KDEPOptions
    capabilities = Capabilities(uses_labels=False, evaluated=False)  # a label-free pre-training

    def __init__(self, student: nn.Module, teacher: nn.Module, options: KDEPOptions, context: DistillContext):
        super().__init__(student, teacher, options, context)
        o = options
        x = context.sample_input
        x = x if x.shape[0] > 1 else x.repeat(2, 1, 1, 1)
        self.fallbacks: list[str] = []
        post = o.alignment == "conv1x1_post_relu"
        self.s_point = o.student_point or self._last_point(student, x, "student", post)
        self.t_point = o.teacher_point or self._last_point(teacher, x, "teacher", post)
        self.s_tap = FeatureTap(student, [self.s_point])
        self.t_tap = FeatureTap(teacher, [self.t_point])
        self.s_shape = self.s_tap.specs(x)[0].shape
        self.t_shape = self.t_tap.specs(x)[0].shape
        self.student_dim, self.teacher_dim = int(self.s_shape[0]), int(self.t_shape[0])
        d_s, d_t = self.student_dim, self.teacher_dim
        a = o.alignment
        self.register_buffer("ready", torch.tensor(a not in OFFLINE))
        # A host mirror of the buffer, so that the step never reads a device value: refreshed wherever the
        # buffer is written (set_alignment) or loaded (a state-dict post-hook).
        self._ready = a not in OFFLINE
        self.register_load_state_dict_post_hook(_refresh_ready)
        if a in ("svd", "cs_var", "cs_rand") and d_s > d_t:
            raise MethodError(
                f"KDEP alignment {a!r} maps the teacher's {d_t} channels ({self.t_point}) to the student's "
                f"{d_s} ({self.s_point}), but there are only {d_t} components/channels to keep. Use "
                "alignment=interp or a conv1x1_* variant, or other feature points."
            )
        if a == "svd":
            self.register_buffer("mean", torch.zeros(d_t))
            self.register_buffer("proj", torch.zeros(d_t, d_s))
        elif a in ("cs_var", "cs_rand"):
            chosen = select_channels(a, d_t, d_s, seed=o.seed) if a == "cs_rand" else torch.arange(d_s)
            self.register_buffer("channels", chosen)
        elif a in PARAMETRIC:
            self.connector = nn.Sequential(nn.Conv2d(d_s, d_t, 1, bias=False), nn.BatchNorm2d(d_t))
            if a == "conv1x1_margin":
                self.register_buffer("margin", torch.zeros(d_t))
        if o.svd_file:
            if a not in OFFLINE:
                raise MethodError(
                    "KDEP: svd_file applies to the alignments computed offline "
                    f"({', '.join(sorted(OFFLINE))}); {a!r} needs none"
                )
            self.set_alignment(load_alignment(o.svd_file), source=o.svd_file)

    # -- feature points -------------------------------------------------------------------------------
    def _last_point(self, net: nn.Module, x: Tensor, who: str, post_relu: bool) -> str:
        fp = feature_points_of(net, x)
        if post_relu:
            return fp.stages[-1]
        if fp.preact[-1]:
            return fp.preact[-1]
        msg = (
            f"KDEP: the {who} ({type(net).__name__}) declares no pre-ReLU point for its last stage; using "
            f"the post-ReLU map {fp.stages[-1]!r} instead (KDEP distils pre-ReLU features; name one with "
            f"method.{who}_point)"
        )
        self.fallbacks.append(msg)
        warnings.warn(msg, MimkdWarning, stacklevel=4)
        return fp.stages[-1]

    # -- the offline pass -----------------------------------------------------------------------------
    def offline_ready(self) -> bool:
        return self._ready

    def offline_pass(self, batches, num_batches: int, run_dir: Path | None) -> None:
        """Pooled teacher features over the images (no labels) → mean, components, margins; stored in the
        buffers and, when ``run_dir`` is given, in ``run_dir/kdep_alignment.pt``."""
        stats = FeatureStats()
        for images in batches:
            _, ft = self.teacher_outputs(images, self.t_tap)
            stats.update(pool(ft[self.t_point]))
        result = stats.finish()
        self.set_alignment(result)
        if run_dir is not None:
            meta = {
                "teacher_point": self.t_point,
                "teacher_dim": self.teacher_dim,
                "student_dim": self.student_dim,
                "alignment": self.options.alignment,
            }
            save_alignment(Path(run_dir) / ALIGNMENT_FILE, result, meta)

    @torch.no_grad()
    def set_alignment(self, stats: dict[str, Any], source: str | None = None) -> None:
        """Fill the alignment buffers from offline statistics (:meth:`FeatureStats.finish` or a file)."""
        mean = stats["mean"]
        if mean.numel() != self.teacher_dim:
            where = f"svd_file {source!r}" if source else "the statistics"
            raise CheckpointError(
                f"KDEP: {where} describe {mean.numel()}-d teacher features (point "
                f"{stats.get('teacher_point', '?')!r}), but this teacher's point {self.t_point!r} has "
                f"{self.teacher_dim} channels: it was computed for another teacher"
            )
        a = self.options.alignment
        if a == "svd":
            self.mean.copy_(mean)
            self.proj.copy_(stats["components"][:, : self.student_dim])
        elif a == "cs_var":
            chosen = select_channels("cs_var", self.teacher_dim, self.student_dim, stats["channel_var"])
            self.channels.copy_(chosen)
        elif a == "conv1x1_margin":
            self.margin.copy_(stats["margin"])
        self.ready.fill_(True)
        self._ready = True

    # -- the loss -------------------------------------------------------------------------------------
    def align(self, f_t: Tensor) -> Tensor:
        """The non-parametric target ``A(f_t)`` (B×D_s) of pooled teacher features."""
        a, o = self.options.alignment, self.options
        if a == "svd":
            out = (f_t - self.mean) @ self.proj
        elif a in ("cs_var", "cs_rand"):
            out = f_t.index_select(1, self.channels)
        elif a == "interp":
            out = interp_channels(f_t, self.student_dim)
        else:
            raise ValueError(f"{a!r} is a parametric alignment")
        return pts(out, o.pts_temperature, o.pts_power) if o.pts else out

    def forward(
        self,
        images: Tensor,
        labels: Tensor | None = None,
        index: Tensor | None = None,
        ctx: StepContext | None = None,
        views: Mapping[str, Tensor] | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        # labels are dropped here, before any method code runs: KDEP never reads them (its capabilities)
        return super().forward(images, None, index, ctx, views)

    def compute(self, images, labels, index=None, ctx=None):
        if not self._ready:
            raise MethodError(
                f"KDEP alignment {self.options.alignment!r} is not computed yet: run offline_pass over the "
                "pre-training images first (the trainer does), or pass svd_file"
            )
        logits, fs, _, ft = self.student_teacher_features(images, self.s_tap, self.t_tap)
        s_feat, f_t = fs[self.s_point], pool(ft[self.t_point])
        a = self.options.alignment
        if a in PARAMETRIC:
            if s_feat.dim() != 4:
                s_feat = s_feat.reshape(s_feat.shape[0], -1, 1, 1)
            pred = pool(self.connector(s_feat))
            if a == "conv1x1_margin":
                mse = partial_l2(pred, torch.maximum(f_t, self.margin))
            else:
                mse = F.mse_loss(pred, f_t)
        else:
            mse = F.mse_loss(pool(s_feat), self.align(f_t))
        self.metrics = {"kdep_mse": mse.detach()}
        return logits, {"kdep": self.options.loss_weight * mse}

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        a = self.options.alignment
        info["student_points"] = {self.s_point: list(self.s_shape)}
        info["teacher_points"] = {self.t_point: list(self.t_shape)}
        info["alignment"] = {
            "kind": a,
            "teacher_dim": self.teacher_dim,
            "student_dim": self.student_dim,
            "offline_pass": a in OFFLINE and not self.options.svd_file,
            "ready": bool(self.ready),
            "pts_applied": bool(self.options.pts) and a not in PARAMETRIC,
        }
        if self.fallbacks:
            info["warnings"] = list(self.fallbacks)
        if a in PARAMETRIC:
            info["modules"] = {"connector": sum(p.numel() for p in self.connector.parameters())}
        return info


def _refresh_ready(module: KDEP, incompatible_keys: Any) -> None:
    """After a state dict is loaded, mirror the ``ready`` buffer on the host (one read, at load time)."""
    module._ready = bool(module.ready)
