"""``fitnets``: FitNets hints (Romero et al.; docs/methods/fitnets.md; RepDistiller ``HintLoss``).

``L_hint = mean((ConvReg(F_s) − F_t)²)`` with ``F_s``, ``F_t`` = ``feat[hint_layer]`` of each network
(default ``hint_layer = 2``) and ConvReg = conv (3×3 s2 / ConvTranspose 4×4 s2 / (1+H_s−H_t)×(1+W_s−W_t)) +
BN + ReLU to the teacher's shape. Defaults are RepDistiller's command line (γ = 1, α = 0, β = 100).

Two forms:

* default (``two_stage=False``, RepDistiller): one stage, ``γ·CE + α·KD + β·L_hint``, regressor trained with
  the student.
* ``two_stage=True`` (the original paper): an init stage ``"hint"`` of ``init_epochs`` epochs trains the
  student's modules that run up to the hint point plus the regressor on ``L_hint`` alone (unweighted, no
  labels); the main stage is then ``γ·CE + α·KD`` without the hint term. The paper's second stage is
  Hinton's KD, so pass e.g. ``kd_weight=0.9, ce_weight=0.1`` to reproduce it (the defaults keep CE only).
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor
from torch.nn import functional as F

from .base import InitStage, StepContext
from .connectors import ConvReg, label_terms, modules_up_to, without_prefixes
from .feature_base import BaselineOptions, FeatureDistiller, FeatureLists
from .registry import register_distiller

__all__ = ["hint_loss", "FitNets", "FitNetsOptions"]


def hint_loss(regressed: Tensor, target: Tensor) -> Tensor:
    """``mean((r − t)²)`` over all elements (``nn.MSELoss()``); zero iff the regressor output equals ``t``."""
    if regressed.shape != target.shape:
        raise ValueError(f"hint shapes differ: {tuple(regressed.shape)} vs {tuple(target.shape)}")
    return F.mse_loss(regressed, target)


class FitNetsOptions(BaselineOptions):
    weight: float = Field(100.0, ge=0.0)  # β
    hint_layer: int = 2  # RepDistiller's --hint_layer: feat[k] of both networks
    two_stage: bool = False  # the original paper's hint pre-training, then the main stage without hints
    init_epochs: int = Field(30, ge=0)  # epochs of the hint stage (two_stage only)


@register_distiller("fitnets")
class FitNets(FeatureDistiller):
    """Hint regression ``feat_s[k] → feat_t[k]`` through a :class:`ConvReg` (docs/methods/fitnets.md)."""

    Options = FitNetsOptions

    def points(self, s: FeatureLists, t: FeatureLists) -> tuple[list[str], list[str]]:
        k = self.options.hint_layer
        self.s_point, self.t_point = s.feat(k), t.feat(k)
        return [self.s_point], [self.t_point]

    def build_modules(self, context) -> None:
        s_spec, t_spec = self.s_specs[self.s_point], self.t_specs[self.t_point]
        self.regressor = ConvReg(s_spec.shape, t_spec.shape, use_relu=True)
        self.hint_modules: list[tuple[str, object]] = []
        if self.options.two_stage:
            self.hint_modules = modules_up_to(self.student, [self.s_point], context.sample_input)

    def method_loss(self, fs, ft, logits, t_logits, index):
        return hint_loss(self.regressor(fs[self.s_point]), ft[self.t_point])

    def hint_stage_loss(
        self, images: Tensor, index: Tensor | None = None, ctx: StepContext | None = None
    ) -> dict[str, Tensor]:
        """The hint stage's loss (no labels): ``L_hint`` alone."""
        _, fs, _, ft = self.run_both(images)
        return {"hint": self.method_loss(fs, ft, None, None, index)}

    def init_stages(self) -> list[InitStage]:
        if not self.options.two_stage:
            return []
        names = [n for n, _ in self.hint_modules]
        return [
            InitStage(
                name="hint",
                epochs=self.options.init_epochs,
                modules=[self.regressor, *(m for _, m in self.hint_modules)],
                loss_fn=self.hint_stage_loss,
                extra={"student_modules": names},
            )
        ]

    def compute(self, images, labels, index=None, ctx=None):
        if self.options.two_stage:  # main stage of the paper's form: no hint term
            return label_terms(self, images, labels)
        return super().compute(images, labels, index, ctx)

    def trainable_named_parameters(self):
        params = super().trainable_named_parameters()
        return without_prefixes(params, ["regressor"]) if self.options.two_stage else params
