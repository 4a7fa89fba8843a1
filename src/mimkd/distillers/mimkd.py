"""``mimkd``: Mutual Information Maximisation Knowledge Distillation (docs/methods/mimkd.md, docs/mimkd.md).

``L = α·CE − λ_g·Î_g − λ_l·Î_l − λ_f·Î_f`` (docs/mimkd.md), with

* **global** (Eq. 3): teacher and student pre-classifier vectors through the "project and dot" critic
  (:class:`~mimkd.mi.critics.ProjectDotCritic`); infoNCE over 4096 negatives from CRD's momentum memory
  banks in both directions (our choice, docs/mimkd.md), or CRD's NCE form, or — the ablation — JSD with
  one shuffled negative and no bank;
* **local** (Eq. 4): the teacher vector replicated over the student map of the deepest pair in R, scored at
  every location by a concat-and-1×1-conv critic, JSD, one shuffled negative (a derangement of the batch);
* **feature** (Eq. 5): one concat-and-1×1-conv critic per pair of same-sized maps in R, region-consistent
  negatives (same location, other image), JSD, averaged over pairs.

R (our rule, docs/methods/mimkd.md) is built from FeatureTap's stage outputs without the stem: for every
spatial size present in both networks, the deepest map of that size on each side, shallow to deep. A term with
weight 0 is not computed and its critic is not built. Teacher tensors never carry gradients; critics,
projection heads and the student all ascend the bounds (one optimiser, as the paper: not adversarial).

Speed: the critics share the first layer between positive and negative pairs (the teacher half is permuted,
not recomputed) and the replicated teacher vector's contribution is computed once per image
(:meth:`~mimkd.mi.critics.ConcatConvCritic.pair_scores`); the bank scores come from one ``z @ Mᵀ``.

Deviations from the paper (none stated there): logit KD off by default (``kd_weight=0``); critic
initialisation is PyTorch's default; our choices above (where the paper is silent), each exposed as an
option. Remedies for
short schedules and small data, all off by default (``docs/mimkd.md``): ``global_positive="live"`` (the bank
term's positive from the current batch instead of the one-epoch-stale bank row), ``critic_warmup_epochs``
(an init stage training the critics and heads with the student frozen), ``critic_lr_scale``; and the named
variant ``mimkd+kd`` (a logit KD term, weight 1).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
import torch.nn as nn
from pydantic import Field

from mimkd.errors import MethodError, MimkdWarning
from mimkd.features import FeatureSpec, FeatureTap, feature_points_of, pair_by_size
from mimkd.mi import ConcatConvCritic, ProjectDotCritic, derangement, jsd_bound, jsd_loss
from mimkd.mi.contrast import BankContrast
from mimkd.mi.critics import sample_locations, sampled_pair_scores
from mimkd.mi.negatives import all_pairs_negatives, roll_derangement

from .base import DistillContext, Distiller, InitStage, MethodOptions, StepContext
from .kd import kd_loss
from .registry import register_distiller

__all__ = ["MIMKD", "MIMKDKD", "MIMKDKDOptions", "MIMKDOptions", "mimkd_jsd_term"]


class MIMKDOptions(MethodOptions):
    """MIMKD's options: the paper's weights (α=1, λ_g=1, λ_l=0.75, λ_f=1), our choices where it is silent."""

    ce_weight: float = Field(1.0, ge=0.0)  # α
    lambda_g: float = Field(1.0, ge=0.0)
    lambda_l: float = Field(0.75, ge=0.0)
    lambda_f: float = Field(1.0, ge=0.0)
    kd_weight: float = Field(0.0, ge=0.0)  # not in the paper: no logit KD by default
    kd_temperature: float = Field(4.0, gt=0.0)
    # global term
    global_estimator: Literal["infonce", "nce", "jsd"] = "infonce"
    global_directions: Literal["both", "student", "teacher"] = "both"
    # [DEVIATION when "live"] the bank term's positive: the sample's bank row (one epoch stale; the paper,
    # CRD) or the other network's embedding of the same image in the current batch (docs/mimkd.md)
    global_positive: Literal["bank", "live"] = "bank"
    # Scores of the JSD global variant (the ablation). A raw dot product was the first design; measured on the
    # Fashion-MNIST stand-in it is unbounded and the run diverged to NaN within 30 steps (lr 0.05), so the
    # default scores unit-norm embeddings over the temperature, as the infoNCE variant does ("dot" keeps
    # the raw dot product).
    jsd_global_score: Literal["cosine", "dot"] = "cosine"
    embed_dim: int = Field(128, ge=1)
    temperature: float = Field(0.07, gt=0.0)
    num_negatives: int = Field(4096, ge=1)
    momentum: float = Field(0.5, ge=0.0, lt=1.0)
    # local and feature critics
    critic_width: int = Field(512, ge=1)
    critic_layers: int = Field(2, ge=1)
    negatives: Literal["derangement", "roll", "all_pairs"] = "derangement"
    local_map: Literal["last_pair", "deepest"] = "last_pair"
    # [DEVIATION when set] the fast path: the local and feature critics score this many random locations of
    # each image (the same ones for its positive and its negative) instead of every location
    critic_locations: int | None = Field(None, ge=1)
    # [DEVIATION when > 0] an init stage of this many epochs that trains the critics and projection heads on
    # the bounds with the student frozen (its weights and BatchNorm statistics unchanged), filling the banks
    critic_warmup_epochs: int = Field(0, ge=0)
    # [DEVIATION when != 1] the critics' and projection heads' learning rate relative to the run's
    critic_lr_scale: float = Field(1.0, gt=0.0)
    # explicit feature points (module paths) instead of the declared / discovered ones
    teacher_maps: list[str] | None = None
    student_maps: list[str] | None = None
    teacher_embedding: str | None = None
    student_embedding: str | None = None


def mimkd_jsd_term(
    critic: nn.Module,
    teacher: torch.Tensor,
    student: torch.Tensor,
    perm: torch.Tensor,
    locations: int | None = None,
):
    """One JSD term (Eq. 2) of a concat-and-conv critic: loss to minimise and the bound ``Î`` (nats).

    ``teacher`` is a map (feature term, Eq. 5) or a vector replicated over the student's locations (local
    term, Eq. 4); ``perm`` pairs each student tensor with another image's teacher tensor. Both expectations
    average over locations and batch (the ``1/m²`` and batch means of Eqs. 4–5). ``locations`` (the opt-in
    fast path, docs/methods/mimkd.md): score that many random locations per image instead of all of them
    (a Monte-Carlo estimate of the same means); ``None`` or at least the map's size scores every location.
    """
    per_image = student.shape[2] * student.shape[3]
    if locations is not None and locations < per_image:
        where = sample_locations(student.shape[0], per_image, locations, student.device)
        pos, neg = sampled_pair_scores(critic, teacher, student, perm, where)
        return jsd_loss(pos, neg), jsd_bound(pos.detach(), neg.detach())
    pos, neg = critic.pair_scores(teacher, student, perm)
    return jsd_loss(pos, neg), jsd_bound(pos.detach(), neg.detach())


def _maps(specs: dict[str, FeatureSpec], names: list[str]) -> list[FeatureSpec]:
    return [specs[n] for n in names if specs[n].is_map and specs[n].shape[1:] != (1, 1)]


@register_distiller("mimkd")
class MIMKD(Distiller):
    """Global + local + feature MI maximisation with learned critics (docs/methods/mimkd.md)."""

    Options = MIMKDOptions

    def __init__(self, student, teacher, options: MIMKDOptions, context: DistillContext) -> None:
        super().__init__(student, teacher, options, context)
        o, x = options, context.sample_input
        if x.shape[0] < 2:
            x = torch.cat([x, x])
        t_fp, s_fp = feature_points_of(teacher, x), feature_points_of(student, x)
        t_maps = o.teacher_maps or list(t_fp.maps)
        s_maps = o.student_maps or list(s_fp.maps)
        t_emb, s_emb = o.teacher_embedding or t_fp.embedding, o.student_embedding or s_fp.embedding
        self.t_tap = FeatureTap(teacher, [*t_maps, t_emb])
        self.s_tap = FeatureTap(student, [*s_maps, s_emb])
        t_specs = {s.name: s for s in self.t_tap.specs(x)}
        s_specs = {s.name: s for s in self.s_tap.specs(x)}
        self.t_emb, self.s_emb = t_emb, s_emb
        d_t = t_specs[t_emb].vector_dim("mimkd", "teacher")
        d_s = s_specs[s_emb].vector_dim("mimkd", "student")
        t_cands, s_cands = _maps(t_specs, t_maps), _maps(s_specs, s_maps)
        pairs = pair_by_size(t_cands, s_cands)
        found = (
            f"teacher maps {[(m.name, m.spatial) for m in t_cands]}, "
            f"student maps {[(m.name, m.spatial) for m in s_cands]}"
        )
        if not pairs and o.lambda_f > 0:
            raise MethodError(
                f"mimkd: the teacher and the student have no feature map size in common, so the feature term "
                f"has nothing to pair ({found}). Set method.lambda_f=0 to train with the global and local "
                "terms only, or name maps with method.teacher_maps / method.student_maps."
            )
        self.pairs = [(t.name, s.name) for t, s in pairs]
        self.pair_specs = pairs
        if o.lambda_l > 0:
            if o.local_map == "deepest" or not pairs:
                if not s_cands:
                    raise MethodError(f"mimkd: the student has no feature map for the local term ({found})")
                if not pairs:
                    warnings.warn(
                        f"method mimkd: no common map size ({found}); the local term uses the student's "
                        f"deepest map {s_cands[-1].name!r} and there is no feature term",
                        MimkdWarning,
                        stacklevel=2,
                    )
                local = s_cands[-1]
            else:
                local = pairs[-1][1]
            self.local_point = local.name
            self.local_critic = ConcatConvCritic(d_t, local.channels, o.critic_width, o.critic_layers)
        if o.lambda_f > 0:
            self.feature_critics = nn.ModuleList(
                ConcatConvCritic(t.channels, s.channels, o.critic_width, o.critic_layers) for t, s in pairs
            )
        if o.lambda_g > 0:
            jsd = o.global_estimator == "jsd"
            normalize = not jsd or o.jsd_global_score == "cosine"
            self.global_critic = ProjectDotCritic(d_t, d_s, o.embed_dim, o.temperature, normalize=normalize)
            if not jsd:
                if context.train_labels is None:
                    raise MethodError(
                        "mimkd: the global infoNCE term needs the training labels (class-aware negatives "
                        "from the memory bank): pass train_labels to build_distiller, or use "
                        "method.global_estimator=jsd"
                    )
                self.contrast = BankContrast(
                    context.train_labels,
                    o.embed_dim,
                    o.num_negatives,
                    o.temperature,
                    o.momentum,
                    loss=o.global_estimator,
                    directions=o.global_directions,
                    positive=o.global_positive,
                )

    # ------------------------------------------------------------------------------------------------
    def _negatives(self, batch: int, device: torch.device) -> torch.Tensor:
        kind = self.options.negatives
        if kind == "roll":
            return roll_derangement(batch, device=device)
        if kind == "all_pairs":
            return all_pairs_negatives(batch, device=device)
        return derangement(batch, device=device)

    def compute(self, images, labels, index=None, ctx=None):
        o = self.options
        logits, fs, t_logits, ft = self.student_teacher_features(images, self.s_tap, self.t_tap)
        terms: dict[str, torch.Tensor] = {}
        if o.ce_weight:
            terms["ce"] = o.ce_weight * self.cross_entropy(logits, labels)
        terms.update(self._mi_terms(fs, ft, index, images.shape[0], images.device))
        if o.kd_weight:
            terms["kd"] = o.kd_weight * kd_loss(logits, t_logits, o.kd_temperature)
        return logits, terms

    def _mi_terms(self, fs, ft, index, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
        """The weighted MI terms (losses to minimise) of student features ``fs`` and teacher features ``ft``;
        the bounds go to ``self.metrics``."""
        o = self.options
        terms: dict[str, torch.Tensor] = {}
        uses_jsd = o.lambda_l > 0 or o.lambda_f > 0 or (o.lambda_g > 0 and o.global_estimator == "jsd")
        perm = self._negatives(batch, device) if uses_jsd else None
        f_t = ft[self.t_emb].flatten(1)
        if o.lambda_g > 0:
            f_s = fs[self.s_emb].flatten(1)
            if o.global_estimator == "jsd":
                pos, neg = self.global_critic.pair_scores(f_t, f_s, perm)
                loss, est = jsd_loss(pos, neg), jsd_bound(pos.detach(), neg.detach())
            else:
                z_s = self.global_critic.embed_student(f_s)
                z_t = self.global_critic.embed_teacher(f_t)
                loss, est = self.contrast(z_s, z_t, index)
            terms["mi_global"] = o.lambda_g * loss
            self.metrics["mi_global"] = est
        if o.lambda_l > 0:
            loss, est = mimkd_jsd_term(self.local_critic, f_t, fs[self.local_point], perm, o.critic_locations)
            terms["mi_local"] = o.lambda_l * loss
            self.metrics["mi_local"] = est
        if o.lambda_f > 0:
            critics = zip(self.feature_critics, self.pairs)
            results = [mimkd_jsd_term(c, ft[t], fs[s], perm, o.critic_locations) for c, (t, s) in critics]
            terms["mi_feature"] = o.lambda_f * torch.stack([r[0] for r in results]).mean()
            self.metrics["mi_feature"] = torch.stack([r[1] for r in results]).mean()
        return terms

    # -- the remedies: critic warm-up and critic learning rate ------------------------------------------
    def _critics(self) -> list[nn.Module]:
        names = ("global_critic", "local_critic", "feature_critics")
        return [getattr(self, n) for n in names if hasattr(self, n)]

    def lr_scales(self) -> dict[str, float]:
        """``critic_lr_scale`` for the critics and projection heads (the student keeps the run's rate)."""
        s = self.options.critic_lr_scale
        if s == 1.0:
            return {}
        return {f"{n}.": s for n in ("global_critic", "local_critic", "feature_critics") if hasattr(self, n)}

    def init_stages(self) -> list[InitStage]:
        """``critic_warmup_epochs`` > 0: the critics and heads train on the bounds, the student frozen."""
        if not self.options.critic_warmup_epochs or not self._critics():
            return []
        return [
            InitStage(
                name="critic_warmup",
                epochs=self.options.critic_warmup_epochs,
                modules=self._critics(),
                loss_fn=self._warmup_terms,
            )
        ]

    def _warmup_terms(
        self, images: torch.Tensor, index: torch.Tensor | None, ctx: StepContext | None = None
    ) -> dict[str, torch.Tensor]:
        # The student runs in train mode (its features as the main training will see them), without
        # gradients, and its BatchNorm statistics are put back: the warm-up leaves it bit-identical.
        with torch.no_grad(), _kept_buffers(self.student):
            self.student.train()
            _, fs = self.tapped(self.s_tap, images, grad=False)
        self.student.eval()
        _, ft = self.teacher_outputs(images, self.t_tap)
        self.metrics = {}
        return self._mi_terms(fs, ft, index, images.shape[0], images.device)

    def describe(self) -> dict:
        o = self.options
        info = super().describe()
        info["pairs"] = [
            {
                "teacher": t.name,
                "teacher_shape": list(t.shape),
                "student": s.name,
                "student_shape": list(s.shape),
            }
            for t, s in self.pair_specs
        ]
        critics: dict[str, nn.Module] = {}
        if o.lambda_g > 0:
            critics["global_critic"] = self.global_critic
        if o.lambda_l > 0:
            critics["local_critic"] = self.local_critic
            info["local_map"] = self.local_point
        if o.lambda_f > 0:
            critics.update({f"feature_critic_{k}": c for k, c in enumerate(self.feature_critics)})
        info["critics"] = {
            name: {"layers": _layer_shapes(c), "params": sum(p.numel() for p in c.parameters())}
            for name, c in critics.items()
        }
        if o.lambda_g > 0 and o.global_estimator != "jsd":
            info["memory_bank"] = {
                "samples": self.contrast.num_samples,
                "dim": o.embed_dim,
                "negatives": o.num_negatives,
                "buffers": 2,
            }
        return info


class MIMKDKDOptions(MIMKDOptions):
    """``mimkd+kd``: MIMKD plus logit KD (T = 4); the CE:KD weights were chosen by measurement against a KD
    control with the same weights (``results/fair_fmnist/``, ``docs/mimkd.md``)."""

    kd_weight: float = Field(1.0, ge=0.0)


@register_distiller("mimkd+kd")
class MIMKDKD(MIMKD):
    """MIMKD with a logit KD term (a named variant, as ``crd+kd``)."""

    Options = MIMKDKDOptions


@contextmanager
def _kept_buffers(module: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``module`` (BatchNorm running statistics, batch counters) on exit."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def _layer_shapes(module: nn.Module) -> list[str]:
    out = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            out.append(f"{name}: conv{m.kernel_size[0]}x{m.kernel_size[1]} {m.in_channels}->{m.out_channels}")
        elif isinstance(m, nn.Linear):
            out.append(f"{name}: linear {m.in_features}->{m.out_features}")
    return out
