"""Shared wiring of the baseline zoo: ``L = γ·CE + α·KD + β·L_method`` over tapped features
(docs/methods/README.md).

A baseline method file holds a pure loss function on tensors, an options class with RepDistiller's
command-line defaults (docs/methods/README.md) and a thin :class:`FeatureDistiller` subclass that

* says which feature points it needs (:meth:`FeatureDistiller.points`), in RepDistiller's vocabulary
  (:class:`FeatureLists`: ``feat[:-1]`` = ``stages``, ``feat[1:-1]`` = ``maps``, ``feat[-2]`` = ``last_map``,
  ``feat[-1]`` = ``embedding``, the ``preact`` variants, and ``feat[k]`` = :meth:`FeatureLists.feat`);
* builds its auxiliary modules from the probed shapes (``self.s_specs`` / ``self.t_specs``);
* implements :meth:`FeatureDistiller.method_loss` on the captured features.

The base runs both networks through forward hooks (teacher without autograd), adds the CE and KD terms and
the weighted method term, so any model works, zoo or foreign.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from mimkd.errors import MethodError
from mimkd.features import FeatureSpec, FeatureTap, feature_points_of
from mimkd.models.registry import FeaturePoints

from .base import DistillContext, Distiller, MethodOptions
from .kd import kd_loss

__all__ = ["BaselineOptions", "FeatureDistiller", "FeatureLists", "pool_to_common", "index_pairs"]


class BaselineOptions(MethodOptions):
    """RepDistiller's loss weights ``γ·CE + α·KD + β·L_method`` (flags ``-r``, ``-a``, ``-b``, ``--kd_T``)."""

    ce_weight: float = Field(1.0, ge=0.0)  # γ
    kd_weight: float = Field(0.0, ge=0.0)  # α
    kd_temperature: float = Field(4.0, gt=0.0)
    weight: float = Field(1.0, ge=0.0)  # β (each method sets its own default)


@dataclass(frozen=True)
class FeatureLists:
    """RepDistiller's feature lists for one network, as hook-point names (docs/methods/README.md)."""

    points: FeaturePoints

    @property
    def stages(self) -> list[str]:
        """``feat[:-1]``: the stem (when the model has one) and every stage output."""
        return list(self.points.stages)

    @property
    def maps(self) -> list[str]:
        """``feat[1:-1]``: the stage outputs without the stem."""
        return list(self.points.maps)

    @property
    def preact_maps(self) -> list[str]:
        """``feat[1:-1]`` with ``preact=True``: pre-activation values where the model has them."""
        n = len(self.points.stages) - len(self.points.maps)
        return [p or s for s, p in zip(self.points.stages[n:], self.points.preact[n:], strict=True)]

    @property
    def last_map(self) -> str:
        """``feat[-2]``: the last feature map."""
        return self.points.stages[-1]

    @property
    def embedding(self) -> str:
        """``feat[-1]``: the pre-classifier vector."""
        return self.points.embedding

    def feat(self, k: int) -> str:
        """``feat[k]`` of RepDistiller's list (index 0 is the stem; a model without a stem starts at 1)."""
        lst = self.stages if self.points.has_stem else [self.stages[0], *self.stages]
        lst = [*lst, self.embedding]
        if not -len(lst) <= k < len(lst):
            raise MethodError(f"feature index {k} is out of range: the list has {len(lst)} entries")
        return lst[k]


def pool_to_common(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger of two maps to the smaller one's spatial size (as RepDistiller)."""
    ha, hb = a.shape[2:], b.shape[2:]
    if ha == hb:
        return a, b
    if ha[0] * ha[1] > hb[0] * hb[1]:
        return F.adaptive_avg_pool2d(a, hb), b
    return a, F.adaptive_avg_pool2d(b, ha)


def index_pairs(teacher: list[str], student: list[str]) -> list[tuple[str, str]]:
    """RepDistiller's ``zip(feat_s, feat_t)``: pair the lists by position, truncated to the shorter."""
    return list(zip(teacher, student, strict=False))


class FeatureDistiller(Distiller):
    """Base of the feature baselines. Subclasses set ``Options`` and implement :meth:`points`,
    :meth:`method_loss` and (optionally) :meth:`build_modules` and :meth:`init_stages`."""

    Options = BaselineOptions
    term_name: str | None = None  # name of the method's loss term (default: the method's name)

    def __init__(self, student, teacher, options, context: DistillContext) -> None:
        super().__init__(student, teacher, options, context)
        x = context.sample_input
        if x.shape[0] < 2:
            x = torch.cat([x, x])
        self.sample_input_shape = tuple(x.shape[1:])
        self.s_lists = FeatureLists(feature_points_of(student, x))
        self.t_lists = FeatureLists(feature_points_of(teacher, x))
        s_points, t_points = self.points(self.s_lists, self.t_lists)
        self.s_tap = FeatureTap(student, s_points)
        self.t_tap = FeatureTap(teacher, t_points)
        self.s_specs: dict[str, FeatureSpec] = {s.name: s for s in self.s_tap.specs(x)}
        self.t_specs: dict[str, FeatureSpec] = {s.name: s for s in self.t_tap.specs(x)}
        self.build_modules(context)

    # -- what subclasses provide ----------------------------------------------------------------------
    def points(self, s: FeatureLists, t: FeatureLists) -> tuple[list[str], list[str]]:
        """The student's and the teacher's hook points the method reads."""
        raise NotImplementedError

    def build_modules(self, context: DistillContext) -> None:
        """Create auxiliary modules (connectors, embeddings) from ``self.s_specs`` / ``self.t_specs``."""

    def method_loss(
        self,
        fs: dict[str, Tensor],
        ft: dict[str, Tensor],
        logits: Tensor,
        t_logits: Tensor,
        index: Tensor | None,
    ) -> Tensor | dict[str, Tensor]:
        """The unweighted method loss ``L_method`` on the captured features.

        A method with several parts may return a dict of named unweighted terms instead: each is logged
        under its own name with the weight ``β · term_weights()[name]`` (β alone for a name not listed).
        """
        raise NotImplementedError

    def term_weights(self) -> dict[str, float]:
        """Per-term weights (times β) of a method whose :meth:`method_loss` returns named terms."""
        return {}

    # -- shared -----------------------------------------------------------------------------------------
    def run_both(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor, dict[str, Tensor]]:
        """Student logits and features (with autograd), teacher logits and features (without)."""
        return self.student_teacher_features(images, self.s_tap, self.t_tap)

    def compute(self, images, labels, index=None, ctx=None):
        o = self.options
        logits, fs, t_logits, ft = self.run_both(images)
        terms: dict[str, Tensor] = {}
        if o.ce_weight:
            terms["ce"] = o.ce_weight * self.cross_entropy(logits, labels)
        if o.kd_weight:
            terms["kd"] = o.kd_weight * kd_loss(logits, t_logits, o.kd_temperature)
        if o.weight:
            loss = self.method_loss(fs, ft, logits, t_logits, index)
            if not isinstance(loss, dict):
                loss = {self.term_name or self.name: loss}
            scale = self.term_weights()
            for name, value in loss.items():
                terms[name] = (o.weight * scale[name] if name in scale else o.weight) * value
        return logits, terms

    def describe(self) -> dict:
        info = super().describe()
        info["student_points"] = {k: list(v.shape) for k, v in self.s_specs.items()}
        info["teacher_points"] = {k: list(v.shape) for k, v in self.t_specs.items()}
        extra = {n: sum(p.numel() for p in m.parameters()) for n, m in self.method_parts().items()}
        info["modules"] = {k: v for k, v in extra.items() if v}
        info["init_stages"] = [{"name": s.name, "epochs": s.epochs} for s in self.init_stages()]
        return info
