"""``ft``: factor transfer (Kim, Park & Kwak, *Paraphrasing Complex Network: Network Compression via Factor
Transfer*, NeurIPS 2018; RepDistiller ``FactorTransfer`` + Paraphraser/Translator). Method page:
``docs/methods/ft.md``.

On ``feat[-2]`` of both networks. A :class:`Paraphraser` (rate k = 0.5, no BN, LeakyReLU 0.1) is trained
alone in an init stage ``"paraphraser"`` (``init_epochs`` = 30) to reconstruct the teacher map,
``mean((P_dec(P_enc(F_t)) − F_t)²)``; afterwards it is frozen (eval mode, no gradient, not in the main
optimiser). Main stage: a trainable :class:`Translator` on the student map and

    φ(F) = L2normalise(flatten(mean_c F²))          (RepDistiller collapses the channels; p1 = 2)
    L_FT = mean_{B×HW} |φ(Translator(F_s)) − φ(P_enc(F_t))|      (p2 = 1; larger map pooled to the smaller)

with ``γ·CE + α·KD + β·L_FT``, β = 200 (RepDistiller's default). The init stage's lr (``init_lr``):
RepDistiller uses 0.01 when the student is one of its CIFAR ResNets / WRNs and the run's base lr otherwise;
``init_lr=None`` applies that rule (:func:`default_init_lr`, by the architecture family the student declares),
a number overrides it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from .base import InitStage, StepContext
from .connectors import without_prefixes
from .feature_base import BaselineOptions, FeatureDistiller, FeatureLists, pool_to_common
from .registry import register_distiller

__all__ = ["factor", "ft_loss", "default_init_lr", "Paraphraser", "Translator", "FT", "FTOptions"]

# the families whose students RepDistiller pre-trains the paraphraser at lr 0.01 (its CIFAR ResNets and WRNs)
INIT_LR_FAMILIES = ("cifar_resnet", "wrn")
INIT_LR = 0.01


def factor(f: Tensor) -> Tensor:
    """``L2normalise(flatten(mean_c F²))``: a ``B×HW`` factor per image, invariant to ``F → c·F``."""
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


def ft_loss(factor_s_map: Tensor, factor_t_map: Tensor) -> Tensor:
    """``mean |φ(s) − φ(t)|`` of two factor maps (the larger one adaptive-avg-pooled to the smaller)."""
    s, t = pool_to_common(factor_s_map, factor_t_map)
    return (factor(s) - factor(t)).abs().mean()


def default_init_lr(student: nn.Module) -> float | None:
    """The paraphraser's init-stage lr for ``student``: :data:`INIT_LR` when its class declares a
    ``family`` in :data:`INIT_LR_FAMILIES`, None (the run's base lr) for any other model, foreign ones too."""
    return INIT_LR if getattr(type(student), "family", None) in INIT_LR_FAMILIES else None


def _conv_stack(channels: list[int], transpose: bool, bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    conv = nn.ConvTranspose2d if transpose else nn.Conv2d
    for c_in, c_out in zip(channels[:-1], channels[1:]):
        layers += [conv(c_in, c_out, 3, 1, 1), *([nn.BatchNorm2d(c_out)] if bn else []), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Encoder conv3×3 ``C→C→kC→kC``, decoder ConvTranspose3×3 ``kC→kC→C→C``; LeakyReLU 0.1 after each."""

    def __init__(self, channels: int, rate: float = 0.5) -> None:
        super().__init__()
        k = max(1, int(channels * rate))
        self.encoder = _conv_stack([channels, channels, k, k], transpose=False, bn=False)
        self.decoder = _conv_stack([k, k, channels, channels], transpose=True, bn=False)

    def forward(self, f: Tensor) -> tuple[Tensor, Tensor]:
        """The factor and the reconstruction of ``f``."""
        z = self.encoder(f)
        return z, self.decoder(z)


class Translator(nn.Module):
    """Conv3×3 ``C_s→C_s→kC_t→kC_t``, each followed by BN and LeakyReLU 0.1."""

    def __init__(self, s_channels: int, t_channels: int, rate: float = 0.5) -> None:
        super().__init__()
        k = max(1, int(t_channels * rate))
        self.encoder = _conv_stack([s_channels, s_channels, k, k], transpose=False, bn=True)

    def forward(self, f: Tensor) -> Tensor:
        return self.encoder(f)


class FTOptions(BaselineOptions):
    weight: float = Field(200.0, ge=0.0)  # β
    rate: float = Field(0.5, gt=0.0, le=1.0)  # k: factor channels = k·C_t
    init_epochs: int = Field(30, ge=0)
    init_lr: float | None = Field(None, gt=0.0)  # None: default_init_lr(student)


@register_distiller("ft")
class FT(FeatureDistiller):
    """Factor transfer through a pre-trained, frozen paraphraser (see the module docstring)."""

    Options = FTOptions

    def points(self, s: FeatureLists, t: FeatureLists) -> tuple[list[str], list[str]]:
        self.s_point, self.t_point = s.last_map, t.last_map
        return [self.s_point], [self.t_point]

    def build_modules(self, context) -> None:
        s_spec, t_spec = self.s_specs[self.s_point], self.t_specs[self.t_point]
        self.paraphraser = Paraphraser(t_spec.channels, self.options.rate)
        self.translator = Translator(s_spec.channels, t_spec.channels, self.options.rate)
        self.paraphraser.eval()

    def train(self, mode: bool = True) -> FT:
        """The paraphraser stays in eval mode: only its init stage (which sets it train itself) trains it."""
        super().train(mode)
        self.paraphraser.eval()
        return self

    def method_loss(self, fs, ft, logits, t_logits, index):
        with torch.no_grad():  # frozen: no gradient reaches the paraphraser in the main stage
            factor_t = self.paraphraser.encoder(ft[self.t_point])
        return ft_loss(self.translator(fs[self.s_point]), factor_t)

    def init_stage_loss(
        self, images: Tensor, index: Tensor | None = None, ctx: StepContext | None = None
    ) -> dict[str, Tensor]:
        """The paraphraser's reconstruction loss on the teacher map (no labels; the student does not run)."""
        _, ft = self.teacher_outputs(images, self.t_tap)
        target = ft[self.t_point]
        _, rec = self.paraphraser(target)
        return {"paraphraser": F.mse_loss(rec, target)}

    def stage_lr(self) -> float | None:
        if self.options.init_lr is not None:
            return self.options.init_lr
        return default_init_lr(self.student)

    def init_stages(self) -> list[InitStage]:
        return [
            InitStage(
                name="paraphraser",
                epochs=self.options.init_epochs,
                modules=[self.paraphraser],
                loss_fn=self.init_stage_loss,
                lr=self.stage_lr(),
            )
        ]

    def trainable_named_parameters(self):
        return without_prefixes(super().trainable_named_parameters(), ["paraphraser"])
