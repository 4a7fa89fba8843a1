"""``ab``: activation-boundary distillation (Heo et al.; docs/methods/ab.md; RepDistiller ``ABLoss``).

Init-only method. On the pre-ReLU maps ``feat[1:-1]`` (``preact=True``), paired by position, each student map
goes through a connector ``c_i`` (identity when channels and size already match, else :class:`ConvReg`
without ReLU: conv + BN) and, with margin ``m = 1``,

    ℓ(s, t) = (s + m)²·[s > −m ∧ t ≤ 0] + (s − m)²·[s ≤ m ∧ t > 0]          (per element)
    L_AB = 3/1000 · Σ_i 2^{i−n+1} · (Σ_elements ℓ(c_i(S_i), T_i)) / B       (i = 0..n−1 over the n pairs)

An init stage ``"ab"`` of ``init_epochs`` (30) epochs trains the connectors and the student's modules that
run up to the deepest map on ``L_AB`` (unweighted, no labels); the main stage is ``γ·CE + α·KD`` only
(RepDistiller sets the main-stage method loss to 0, so β, default 1, multiplies nothing and the term is not
computed).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field
from torch import Tensor, nn

from .base import InitStage, StepContext
from .connectors import ConvReg, label_terms, modules_up_to, without_prefixes
from .feature_base import BaselineOptions, FeatureDistiller, FeatureLists, index_pairs
from .registry import register_distiller

__all__ = ["ab_layer_loss", "ab_loss", "AB", "ABOptions"]


def ab_layer_loss(s: Tensor, t: Tensor, margin: float = 1.0) -> Tensor:
    """``Σ (s+m)²·[s>−m ∧ t≤0] + (s−m)²·[s≤m ∧ t>0]`` over all elements; ``s = 0`` gives 1 per element."""
    if s.shape != t.shape:
        raise ValueError(f"AB map shapes differ: student {tuple(s.shape)}, teacher {tuple(t.shape)}")
    neg = ((s > -margin) & (t <= 0)).to(s.dtype)
    pos = ((s <= margin) & (t > 0)).to(s.dtype)
    return ((s + margin).pow(2) * neg + (s - margin).pow(2) * pos).sum()


def ab_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], margin: float = 1.0) -> Tensor:
    """``3/1000 · Σ_i 2^{i−n+1} · ab_layer_loss(s_i, t_i) / B`` over ``n`` pairs (the deepest weighs 1)."""
    n = len(student)
    if n == 0 or n != len(teacher):
        raise ValueError(
            f"AB needs as many student as teacher maps (got {n} and {len(teacher)}), at least one"
        )
    batch = student[0].shape[0]
    total = sum(
        2.0 ** (i - n + 1) * ab_layer_loss(s, t, margin) for i, (s, t) in enumerate(zip(student, teacher))
    )
    return total / batch * 3.0 / 1000.0


class ABOptions(BaselineOptions):
    weight: float = Field(1.0, ge=0.0)  # β: RepDistiller's -b 1 (multiplies a main-stage loss of 0)
    margin: float = Field(1.0, gt=0.0)
    init_epochs: int = Field(30, ge=0)


@register_distiller("ab")
class AB(FeatureDistiller):
    """Activation boundaries learnt in an init stage; CE (+ optional KD) afterwards (docs/methods/ab.md)."""

    Options = ABOptions

    def points(self, s: FeatureLists, t: FeatureLists) -> tuple[list[str], list[str]]:
        self.pairs = index_pairs(t.preact_maps, s.preact_maps)  # (teacher, student)
        return [sp for _, sp in self.pairs], [tp for tp, _ in self.pairs]

    def build_modules(self, context) -> None:
        connectors = []
        for tp, sp in self.pairs:
            s_shape, t_shape = self.s_specs[sp].shape, self.t_specs[tp].shape
            connectors.append(
                nn.Identity() if s_shape == t_shape else ConvReg(s_shape, t_shape, use_relu=False)
            )
        self.connectors = nn.ModuleList(connectors)
        self.feature_modules = modules_up_to(self.student, [sp for _, sp in self.pairs], context.sample_input)

    def method_loss(self, fs, ft, logits, t_logits, index):
        s = [c(fs[sp]) for c, (_, sp) in zip(self.connectors, self.pairs)]
        return ab_loss(s, [ft[tp] for tp, _ in self.pairs], self.options.margin)

    def init_stage_loss(
        self, images: Tensor, index: Tensor | None = None, ctx: StepContext | None = None
    ) -> dict[str, Tensor]:
        """The init stage's loss (no labels): ``L_AB`` through the connectors."""
        _, fs, _, ft = self.run_both(images)
        return {"ab": self.method_loss(fs, ft, None, None, index)}

    def init_stages(self) -> list[InitStage]:
        return [
            InitStage(
                name="ab",
                epochs=self.options.init_epochs,
                modules=[self.connectors, *(m for _, m in self.feature_modules)],
                loss_fn=self.init_stage_loss,
                extra={"student_modules": [n for n, _ in self.feature_modules]},
            )
        ]

    def compute(self, images, labels, index=None, ctx=None):
        return label_terms(self, images, labels)  # main-stage method loss is 0: not computed

    def trainable_named_parameters(self):
        return without_prefixes(super().trainable_named_parameters(), ["connectors"])
