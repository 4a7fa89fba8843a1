"""KDEP's feature alignment pieces (docs/methods/kdep.md, supplementary B.3): pure tensor functions and the
offline statistics, kept apart from the distiller (:mod:`mimkd.distillers.kdep`).

* :func:`pts`: power temperature scaling ``PTS(x) = sign(x)·|x/T|^{1/n}`` (T = 0.1, n = 3: released code).
* :class:`FeatureStats`: one streaming pass over the teacher's pooled features ``X`` (N×d) accumulating, in
  float64, ``Σx``, ``XᵀX`` and the per-channel sums/counts of negative values. :meth:`FeatureStats.finish`
  gives the mean ``μ``, every right singular vector of ``X − μ`` (as the eigenvectors of the centred scatter
  matrix ``(X − μ)ᵀ(X − μ) = V S² Vᵀ``, so ``X`` is never stored: 10 % of ImageNet is 128k × 2048), the
  component variances ``S²/N`` (decreasing), the per-channel variances (CS.var) and the per-channel margin
  ``E[x | x < 0]`` (Heo et al., ICCV 2019).
* :func:`select_channels` (CS.var / CS.rand), :func:`interp_channels` (nearest-neighbour along channels),
  :func:`partial_l2` (Heo's partial L2 with a margin-ReLU target).
* :func:`save_alignment` / :func:`load_alignment`: ``kdep_alignment.pt``, reusable by another run
  (``method.svd_file``).

Deviations / choices:

* The singular vectors come from ``eigh`` of the float64 scatter matrix instead of ``svd(X − μ)``: the same
  subspace and values (``S_k² = λ_k``); every one of the ``d`` vectors is kept, even when ``N < d`` (the
  surplus ones span the null space of the data, where every centred feature projects to 0).
* Singular vectors have no intrinsic sign; each is flipped so that its largest-magnitude entry is positive,
  which makes the projection a deterministic function of the data.
* Heo's margin is derived from BN statistics under a Gaussian assumption; here it is measured on the data,
  per channel, on the same pooled pre-ReLU features the loss compares: ``E[x | x < 0]``, 0 for a channel
  that is never negative (its margin-ReLU is then a plain ReLU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mimkd.errors import CheckpointError, MethodError

__all__ = [
    "ALIGNMENT_FORMAT",
    "ALIGNMENT_FILE",
    "pts",
    "pool",
    "FeatureStats",
    "select_channels",
    "interp_channels",
    "partial_l2",
    "save_alignment",
    "load_alignment",
]

ALIGNMENT_FORMAT = "mimkd-kdep-alignment"
ALIGNMENT_FILE = "kdep_alignment.pt"


def pts(x: Tensor, temperature: float = 0.1, power: float = 3.0) -> Tensor:
    """Power temperature scaling ``sign(x)·|x/T|^{1/n}``: odd, monotone, sign- and order-preserving.

    ``PTS(0) = 0``, ``PTS(T) = 1``; with T = 0.1, n = 3: ``PTS(0.8) = 2``, ``PTS(−2.7) = −3``.
    """
    return torch.sign(x) * (x.abs() / temperature).pow(1.0 / power)


def pool(x: Tensor) -> Tensor:
    """Global average pooling of a ``B×C×H×W`` map to ``B×C``; a ``B×C`` vector passes through."""
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    if x.dim() == 2:
        return x
    return x.flatten(1)


class FeatureStats:
    """Streaming statistics of pooled features, accumulated in float64 on the features' device."""

    def __init__(self) -> None:
        self.n = 0
        self.sum: Tensor | None = None
        self.scatter: Tensor | None = None
        self.neg_sum: Tensor | None = None
        self.neg_count: Tensor | None = None

    def update(self, x: Tensor) -> None:
        """Add a ``B×d`` batch of features."""
        x = x.detach().to(torch.float64)
        if x.dim() != 2:
            raise ValueError(f"FeatureStats expects B×d features, got shape {tuple(x.shape)}")
        if self.sum is None:
            d = x.shape[1]
            self.sum = x.new_zeros(d)
            self.scatter = x.new_zeros(d, d)
            self.neg_sum = x.new_zeros(d)
            self.neg_count = x.new_zeros(d)
        assert self.scatter is not None and self.neg_sum is not None and self.neg_count is not None
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.scatter += x.T @ x
        neg = x < 0
        self.neg_sum += torch.where(neg, x, torch.zeros_like(x)).sum(0)
        self.neg_count += neg.sum(0).to(torch.float64)

    def finish(self) -> dict[str, Any]:
        """``mean`` (d), ``components`` (d×d, column k = k-th right singular vector of ``X − μ``),
        ``variances`` (d, ``S_k²/N`` decreasing), ``channel_var`` (d), ``margin`` (d), ``num_samples``;
        every tensor float32 on the CPU."""
        if self.sum is None or self.n < 2:
            raise MethodError(
                f"KDEP: the offline pass saw {self.n} image(s); the alignment needs at least 2 (is the "
                "training set empty?)"
            )
        assert self.scatter is not None and self.neg_sum is not None and self.neg_count is not None
        n = self.n
        mean = self.sum / n
        centred = self.scatter - n * torch.outer(mean, mean)
        centred = 0.5 * (centred + centred.T)
        evals, evecs = torch.linalg.eigh(centred)  # ascending
        evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
        idx = evecs.abs().argmax(0)
        signs = torch.sign(evecs[idx, torch.arange(evecs.shape[1], device=evecs.device)])
        evecs = evecs * torch.where(signs == 0, torch.ones_like(signs), signs)
        margin = torch.where(
            self.neg_count > 0, self.neg_sum / self.neg_count.clamp_min(1.0), torch.zeros_like(self.neg_sum)
        )

        def out(t: Tensor) -> Tensor:
            return t.to(device="cpu", dtype=torch.float32).contiguous()

        return {
            "mean": out(mean),
            "components": out(evecs),
            "variances": out(evals / n),
            "channel_var": out(torch.diagonal(centred) / n),
            "margin": out(margin),
            "num_samples": n,
        }


def select_channels(kind: str, dim: int, k: int, channel_var: Tensor | None = None, seed: int = 0) -> Tensor:
    """``k`` of ``dim`` channel indices, in increasing order: the ``k`` with the largest variance
    (``cs_var``) or ``k`` drawn at random with ``seed`` (``cs_rand``)."""
    if k > dim:
        raise MethodError(f"KDEP {kind}: cannot select {k} channels out of {dim}")
    if kind == "cs_var":
        if channel_var is None:
            raise ValueError("cs_var needs the channel variances")
        chosen = torch.argsort(channel_var.cpu(), descending=True, stable=True)[:k]
    elif kind == "cs_rand":
        chosen = torch.randperm(dim, generator=torch.Generator().manual_seed(seed))[:k]
    else:
        raise ValueError(f"unknown channel selection {kind!r}")
    return chosen.sort().values


def interp_channels(x: Tensor, k: int) -> Tensor:
    """Nearest-neighbour interpolation of ``B×d`` features along the channel axis to ``B×k``
    (``F.interpolate(mode="nearest")``, PyTorch's default, as the supplementary's B.3)."""
    return F.interpolate(x.unsqueeze(1), size=k, mode="nearest").squeeze(1)


def partial_l2(student: Tensor, target: Tensor) -> Tensor:
    """Heo et al.'s partial L2, averaged over all elements: ``(s − t)²`` except where ``s ≤ t`` and ``t ≤ 0``
    (the student is already below a negative — margin — target, which a ReLU would erase anyway)."""
    keep = (student > target) | (target > 0)
    return ((student - target).pow(2) * keep.to(student.dtype)).mean()


def save_alignment(path: Path, stats: dict[str, Any], meta: dict[str, Any]) -> None:
    """Write ``stats`` (from :meth:`FeatureStats.finish`) and ``meta`` atomically to ``path``."""
    from mimkd.checkpoint import atomic_save

    atomic_save({"format": ALIGNMENT_FORMAT, **meta, **stats}, path)


def load_alignment(path: str | Path) -> dict[str, Any]:
    """Read a ``kdep_alignment.pt`` (a run directory holding one is accepted too)."""
    from mimkd.checkpoint import load_checkpoint

    p = Path(path)
    if p.is_dir():
        p = p / ALIGNMENT_FILE
    if not p.exists():
        raise CheckpointError(
            f"KDEP svd_file {str(p)!r} does not exist (give the kdep_alignment.pt of an earlier KDEP run, or "
            "its run directory)"
        )
    obj = load_checkpoint(p)
    if obj.get("format") != ALIGNMENT_FORMAT:
        raise CheckpointError(f"{str(p)!r} is not a KDEP alignment file (kdep_alignment.pt)")
    return obj
