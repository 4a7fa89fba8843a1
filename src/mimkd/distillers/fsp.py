"""``fsp``: flow of solution procedure (Yim et al.; docs/methods/fsp.md, RepDistiller ``FSP``).

Init-only method on ``feat[:-1]`` (stem and stage outputs), paired by position. For consecutive maps ``bot =
F_k``, ``top = F_{k+1}`` of one network (the larger one adaptive-avg-pooled to the smaller size)

    G_k = mean_{HW}(top ⊗ bot)      (B × C_{k+1} × C_k)
    L_FSP = Σ_k mean((G_k^s − G_k^t)²)

which needs equal channel counts at every paired index (else a :class:`MethodError` naming the layers: the
"N/A" of wrn_40_2 → wrn_40_1). An init stage ``"fsp"`` of ``init_epochs`` (30) epochs trains the student's
modules that run up to its deepest paired map on ``L_FSP`` (unweighted, no labels); the main stage is
``γ·CE + α·KD`` only (RepDistiller's main-stage method loss is 0, so β = 50 multiplies nothing and the term
is not computed).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field
from torch import Tensor

from mimkd.errors import MethodError

from .base import InitStage, StepContext
from .connectors import label_terms, modules_up_to
from .feature_base import BaselineOptions, FeatureDistiller, FeatureLists, index_pairs, pool_to_common
from .registry import register_distiller

__all__ = ["fsp_matrix", "fsp_loss", "FSP", "FSPOptions"]


def fsp_matrix(bot: Tensor, top: Tensor) -> Tensor:
    """``G = mean_{HW}(top ⊗ bot)``: ``B × C_top × C_bot`` (the larger map pooled to the smaller size)."""
    bot, top = pool_to_common(bot, top)
    return top.flatten(2) @ bot.flatten(2).transpose(1, 2) / (bot.shape[2] * bot.shape[3])


def fsp_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """``Σ_k mean((G(s_k, s_{k+1}) − G(t_k, t_{k+1}))²)`` over consecutive maps (equal list lengths)."""
    if len(student) != len(teacher) or len(student) < 2:
        raise ValueError(f"FSP needs two equally long lists of ≥ 2 maps (got {len(student)}, {len(teacher)})")
    total = student[0].new_zeros(())
    for k in range(len(student) - 1):
        g_s = fsp_matrix(student[k], student[k + 1])
        g_t = fsp_matrix(teacher[k], teacher[k + 1])
        total = total + (g_s - g_t).pow(2).mean()
    return total


class FSPOptions(BaselineOptions):
    weight: float = Field(50.0, ge=0.0)  # β: RepDistiller's -b 50 (multiplies a main-stage loss of 0)
    init_epochs: int = Field(30, ge=0)


@register_distiller("fsp")
class FSP(FeatureDistiller):
    """FSP matrices matched in an init stage; CE (+ optional KD) afterwards (docs/methods/fsp.md)."""

    Options = FSPOptions

    def points(self, s: FeatureLists, t: FeatureLists) -> tuple[list[str], list[str]]:
        self.pairs = index_pairs(t.stages, s.stages)  # (teacher, student)
        return [sp for _, sp in self.pairs], [tp for tp, _ in self.pairs]

    def build_modules(self, context) -> None:
        bad = [
            f"#{i} teacher {tp!r} {self.t_specs[tp].channels} ch vs student {sp!r} "
            f"{self.s_specs[sp].channels} ch"
            for i, (tp, sp) in enumerate(self.pairs)
            if self.t_specs[tp].channels != self.s_specs[sp].channels
        ]
        if bad:
            raise MethodError(
                "fsp needs equal channel counts at every feat[:-1] index of teacher and student (RepDistiller"
                " reports this pair as N/A); mismatching layers (#position in feat[:-1]): " + "; ".join(bad)
            )
        if len(self.pairs) < 2:
            raise MethodError("fsp needs at least two feature maps in each network (feat[:-1])")
        self.feature_modules = modules_up_to(self.student, [sp for _, sp in self.pairs], context.sample_input)

    def method_loss(self, fs, ft, logits, t_logits, index):
        return fsp_loss([fs[sp] for _, sp in self.pairs], [ft[tp] for tp, _ in self.pairs])

    def init_stage_loss(
        self, images: Tensor, index: Tensor | None = None, ctx: StepContext | None = None
    ) -> dict[str, Tensor]:
        """The init stage's loss (no labels): ``L_FSP``."""
        _, fs, _, ft = self.run_both(images)
        return {"fsp": self.method_loss(fs, ft, None, None, index)}

    def init_stages(self) -> list[InitStage]:
        return [
            InitStage(
                name="fsp",
                epochs=self.options.init_epochs,
                modules=[m for _, m in self.feature_modules],
                loss_fn=self.init_stage_loss,
                extra={"student_modules": [n for n, _ in self.feature_modules]},
            )
        ]

    def compute(self, images, labels, index=None, ctx=None):
        return label_terms(self, images, labels)  # main-stage method loss is 0: not computed
