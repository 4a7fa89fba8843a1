"""MI estimators on data of known mutual information: the library's bounds and critics, estimate vs truth.

What: every variational MI bound of :mod:`mimkd.mi.bounds` (JSD, infoNCE with a small and a large number of
negatives, Donsker-Varadhan) trains its own critic of :mod:`mimkd.mi.critics` (the separable
``ProjectDotCritic`` and the concat-and-1×1-conv ``ConcatConvCritic``) by maximising that bound on correlated
Gaussians ``x, y ∈ R^d`` (each pair ``(x_i, y_i)`` standard normal with correlation ``ρ``, so the true MI is
``-d/2 · log(1 - ρ²)`` nats). Every (critic family, bound, MI level) gets a fresh critic, trained on fresh
samples every step; the trained critic's bound is then evaluated on fresh held-out batches. The JSD-trained
critic is also read as an MI estimator (its DV and infoNCE values), as the literature does. DV values are
computed three ways: on the batch's own pairs (the training layout, the library's ``dv_bound``), against a
large pool of fresh independent pairs, and with ``log E_q[e^T]`` importance-sampled through the known density
ratio (the critic's actual DV bound), which separates DV's small-sample bias from the bound itself.

Writes ``OUT.md`` (tables and findings), ``OUT.json`` (all numbers, settings, wall time, load average) and
``OUT.png`` (estimate vs truth, one panel per critic family).

How to run (about 7 minutes on one CPU thread; ``--quick`` takes under a minute)::

    .venv/bin/python benchmarks/bench_mi_estimators.py --steps 1000 --seed 0 --out results/mi_estimators
    .venv/bin/python benchmarks/bench_mi_estimators.py --quick --out /tmp/mi_quick

References: B. Poole, S. Ozair, A. van den Oord, A. Alemi, G. Tucker, "On variational bounds of mutual
information", ICML 2019 (the Gaussian benchmark, infoNCE's log(K+1) ceiling, the variance of DV-type bounds);
M. I. Belghazi et al., "Mutual information neural estimation" (MINE), ICML 2018 (the DV bound with a neural
critic); R. D. Hjelm et al., "Learning deep representations by mutual information estimation and
maximization" (Deep InfoMax), ICLR 2019 (the JSD estimator).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from mimkd.mi import (
    ConcatConvCritic,
    ProjectDotCritic,
    all_pairs_negatives,
    derangement,
    dv_bound,
    infonce_bound,
    jsd_bound,
)
from mimkd.mi.bounds import LOG4

FAMILIES = ("separable", "concat")
FAMILY_LABELS = {
    "separable": "separable: ProjectDotCritic (raw dot product of 64-d projections)",
    "concat": "concat: ConcatConvCritic (1×1 convs 40 → 64 → 64 → 1 on 1×1 maps)",
}


@dataclass(frozen=True)
class Estimator:
    """A bound and its negatives: ``k=None`` is one derangement negative per positive (MIMKD's JSD layout),
    ``k = batch - 1`` every other sample of the batch, otherwise ``k`` random distinct other samples."""

    name: str
    bound: str  # "jsd" | "infonce" | "dv"
    batch: int
    k: int | None


ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator("jsd", "jsd", 128, None),
        Estimator("nce16", "infonce", 128, 15),
        Estimator("nce128", "infonce", 128, 127),
        Estimator("nce512", "infonce", 512, 511),
        Estimator("dv", "dv", 128, 127),
    )
}
# Reported estimates: (column, trained by, label); jsd_*, *_pool and *_is are read-outs of a trained critic.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("jsd", "jsd", "JSD bound (shifted, ≤ log 4)"),
    ("jsd_dv", "jsd", "JSD critic → DV, in-batch"),
    ("jsd_dv_is", "jsd", "JSD critic → DV, IS"),
    ("jsd_nce128", "jsd", "JSD critic → infoNCE K+1=128"),
    ("nce16", "nce16", "infoNCE K+1=16"),
    ("nce128", "nce128", "infoNCE K+1=128"),
    ("nce512", "nce512", "infoNCE K+1=512"),
    ("dv", "dv", "DV, in-batch"),
    ("dv_pool", "dv", "DV critic → DV, pool"),
    ("dv_is", "dv", "DV critic → DV, IS"),
)
CEILINGS = {"jsd": LOG4, "nce16": math.log(16), "nce128": math.log(128), "nce512": math.log(512)}
SKIPPED = {"concat/nce512": "a 512×511-pair step of the concat critic takes ~0.5 s on one thread"}


@dataclass
class Settings:
    dim: int = 20
    mi_levels: tuple[float, ...] = (0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0)
    steps: int = 1000
    lr: float = 3e-3  # Adam, cosine-decayed to 0 over the steps
    eval_batches: int = 20
    pool: int = 65536  # pairs per held-out batch for the pool and importance-sampled (IS) DV read-outs
    seed: int = 0
    embed_dim: int = 64  # ProjectDotCritic(normalize=False): raw dot product of embed_dim-d projections
    concat_hidden: int = 64  # ConcatConvCritic: 1×1 convs 2d -> hidden -> hidden -> 1
    concat_layers: int = 2
    families: tuple[str, ...] = FAMILIES
    estimators: tuple[str, ...] = tuple(ESTIMATORS)
    skipped: dict[str, str] = field(default_factory=lambda: dict(SKIPPED))


# ------------------------------------------------------------------------------------------------- data
def rho_for_mi(mi: float, dim: int) -> float:
    """Per-coordinate correlation ``ρ`` that gives a total MI of ``mi`` nats in ``dim`` dimensions."""
    return math.sqrt(1.0 - math.exp(-2.0 * mi / dim))


def true_mi(rho: float, dim: int) -> float:
    """``-d/2 · log(1 - ρ²)`` nats."""
    return -0.5 * dim * math.log1p(-rho * rho)


def sample_pairs(batch: int, dim: int, rho: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``x ~ N(0, I)``, ``y = ρx + sqrt(1-ρ²)·ε``: a batch of the joint (of the product when ``ρ = 0``)."""
    x = torch.randn(batch, dim, generator=gen)
    eps = torch.randn(batch, dim, generator=gen)
    return x, rho * x + math.sqrt(1.0 - rho * rho) * eps


def negatives(est: Estimator, gen: torch.Generator) -> Tensor:
    """Teacher indices of the negatives of each positive, ``(B,)`` or ``(B, K)`` (never the positive)."""
    if est.k is None:
        return derangement(est.batch, generator=gen)
    every = all_pairs_negatives(est.batch)
    if est.k == est.batch - 1:
        return every
    pick = torch.rand(est.batch, est.batch - 1, generator=gen).argsort(dim=1)[:, : est.k]
    return every.gather(1, pick)


# ----------------------------------------------------------------------------------------------- critics
def make_critic(family: str, settings: Settings) -> nn.Module:
    d = settings.dim
    if family == "separable":
        return ProjectDotCritic(d, d, dim=settings.embed_dim, normalize=False)
    if family == "concat":
        return ConcatConvCritic(d, d, hidden=settings.concat_hidden, num_hidden_layers=settings.concat_layers)
    raise ValueError(f"unknown critic family {family!r}; expected one of {FAMILIES}")


def separable_matrix(critic: ProjectDotCritic, x: Tensor, y: Tensor) -> Tensor:
    """``S[b, j] = T(x_j, y_b)`` for all pairs via the critic's embeddings (one GEMM instead of B×B×dim)."""
    s = critic.embed_student(y) @ critic.embed_teacher(x).t()
    return s / critic.temperature if critic.normalize else s


def pair_scores(critic: nn.Module, x: Tensor, y: Tensor, perm: Tensor) -> tuple[Tensor, Tensor]:
    """Positive scores ``(B,)`` and negative scores ``perm.shape``: ``neg[b, k] = T(x_perm[b,k], y_b)``.

    x plays the teacher, y the student. The concat critic gets both as ``B×d×1×1`` maps; the separable
    critic's whole-batch case goes through :func:`separable_matrix` (``pair_scores`` would build B×K×dim).
    """
    batch = x.shape[0]
    if isinstance(critic, ConcatConvCritic):
        pos, neg = critic.pair_scores(x[:, :, None, None], y[:, :, None, None], perm)
        return pos.reshape(batch), neg.reshape(perm.shape)
    if perm.dim() == 2 and perm.shape[1] == batch - 1:
        s = separable_matrix(critic, x, y)
        return s.diagonal(), s.gather(1, perm)
    return critic.pair_scores(x, y, perm)


def aligned_scores(critic: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``T(x_i, y_i)`` of aligned rows, shape ``(N,)`` (the critics' ``forward``)."""
    if isinstance(critic, ConcatConvCritic):
        return critic(x[:, :, None, None], y[:, :, None, None]).reshape(-1)
    return critic(x, y)


def bound_of(kind: str, pos: Tensor, neg: Tensor) -> Tensor:
    """The library bound ``kind`` on these scores (JSD in DIM's shifted form: 0 at independence)."""
    if kind == "jsd":
        return jsd_bound(pos, neg, shift=True)
    if kind == "infonce":
        return infonce_bound(pos, neg)
    if kind == "dv":
        return dv_bound(pos, neg)
    raise ValueError(f"unknown bound {kind!r}")


# ------------------------------------------------------------------------------------- train and evaluate
def run_seed(settings: Settings, family: str, est: str, mi: float) -> int:
    """A seed of its own for each run (stable across processes, unlike ``hash``)."""
    return settings.seed * 1_000_003 + zlib.crc32(f"{family}/{est}/{mi:.6g}".encode()) % 1_000_000


def train_critic(family: str, est: Estimator, mi: float, settings: Settings) -> tuple[nn.Module, list[float]]:
    """Maximise ``est``'s bound with Adam (cosine-decayed learning rate) on fresh samples every step.

    Returns the critic and the bound's value on the training batch every 50 steps."""
    seed = run_seed(settings, family, est.name, mi)
    torch.manual_seed(seed)
    critic = make_critic(family, settings)
    gen = torch.Generator().manual_seed(seed)
    rho = rho_for_mi(mi, settings.dim)
    opt = torch.optim.Adam(critic.parameters(), lr=settings.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=settings.steps)
    curve: list[float] = []
    critic.train()
    for step in range(settings.steps):
        x, y = sample_pairs(est.batch, settings.dim, rho, gen)
        pos, neg = pair_scores(critic, x, y, negatives(est, gen))
        value = bound_of(est.bound, pos, neg)
        opt.zero_grad(set_to_none=True)
        (-value).backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == settings.steps - 1:
            curve.append(float(value.detach()))
    return critic, curve


def log_density_ratio(x: Tensor, y: Tensor, rho: float) -> Tensor:
    """``log p(x, y) / (p(x) p(y))`` of the benchmark's Gaussians, per row (its mean under p is the MI)."""
    one = 1.0 - rho * rho
    quad = (x * x - 2.0 * rho * x * y + y * y) / (2.0 * one) - 0.5 * (x * x + y * y)
    return (-0.5 * math.log(one) - quad).sum(dim=1)


def pool_dv(critic: nn.Module, pos: Tensor, settings: Settings, gen: torch.Generator) -> float:
    """DV with the batch's positives and ``settings.pool`` fresh independent (product-of-marginals) pairs."""
    x = torch.randn(settings.pool, settings.dim, generator=gen)
    y = torch.randn(settings.pool, settings.dim, generator=gen)
    return float(dv_bound(pos, aligned_scores(critic, x, y)))


def is_dv(critic: nn.Module, pos: Tensor, rho: float, settings: Settings, gen: torch.Generator) -> float:
    """The critic's DV value with ``log E_q[e^T]`` importance-sampled: ``settings.pool`` pairs, half from
    the joint ``p`` and half from the product ``q``, weighted by ``q/m = 2/(1 + p/q)`` (≤ 2) for the
    mixture ``m``; the true ``p/q`` is known here. Unlike the plain log-mean-exp over product samples, this
    sees the scores where the joint lives, which at high MI the product almost never visits."""
    half = settings.pool // 2
    xj, yj = sample_pairs(half, settings.dim, rho, gen)
    xq, yq = sample_pairs(half, settings.dim, 0.0, gen)
    x, y = torch.cat([xj, xq]), torch.cat([yj, yq])
    log_w = math.log(2.0) - torch.nn.functional.softplus(log_density_ratio(x, y, rho))
    return float(dv_bound(pos, aligned_scores(critic, x, y) + log_w))


def readouts(
    critic: nn.Module,
    est: Estimator,
    batch: tuple[Tensor, Tensor, Tensor],
    rho: float,
    settings: Settings,
    gen: torch.Generator,
) -> dict[str, float]:
    """Other estimates from one critic on one held-out batch ``(x, y, positive scores)``: the JSD critic's
    DV (in-batch and importance-sampled) and whole-batch infoNCE values; the DV critic's pool and IS DV."""
    x, y, pos = batch
    if est.name == "jsd":
        pos_all, neg_all = pair_scores(critic, x, y, all_pairs_negatives(est.batch))
        return {
            "jsd_dv": float(dv_bound(pos_all, neg_all)),
            "jsd_dv_is": is_dv(critic, pos, rho, settings, gen),
            "jsd_nce128": float(infonce_bound(pos_all, neg_all)),
        }
    if est.name == "dv":
        return {
            "dv_pool": pool_dv(critic, pos, settings, gen),
            "dv_is": is_dv(critic, pos, rho, settings, gen),
        }
    return {}


@torch.no_grad()
def evaluate(critic: nn.Module, est: Estimator, mi: float, settings: Settings) -> dict[str, list[float]]:
    """The trained bound on ``eval_batches`` fresh held-out batches (a generator of its own, the critic in
    eval mode) and the :func:`readouts` on the same batches."""
    gen = torch.Generator().manual_seed(run_seed(settings, "eval", est.name, mi) + 17)
    rho = rho_for_mi(mi, settings.dim)
    critic.eval()
    out: dict[str, list[float]] = {col: [] for col, by, _ in COLUMNS if by == est.name}
    for _ in range(settings.eval_batches):
        x, y = sample_pairs(est.batch, settings.dim, rho, gen)
        pos, neg = pair_scores(critic, x, y, negatives(est, gen))
        out[est.name].append(float(bound_of(est.bound, pos, neg)))
        for col, value in readouts(critic, est, (x, y, pos), rho, settings, gen).items():
            out[col].append(value)
    return out


def summarise(values: list[float]) -> dict[str, float]:
    """Mean, std (over held-out batches), min and max; NaN when any value is not finite."""
    t = torch.tensor(values, dtype=torch.float64)
    finite = bool(torch.isfinite(t).all())
    nan = float("nan")
    return {
        "mean": float(t.mean()) if finite else nan,
        "std": float(t.std()) if finite and len(values) > 1 else nan,
        "min": float(t.min()) if finite else nan,
        "max": float(t.max()) if finite else nan,
    }


def run_one(family: str, est_name: str, mi: float, settings: Settings) -> dict[str, object]:
    """Train and evaluate one (critic family, estimator, MI level); a summary per reported estimate."""
    est = ESTIMATORS[est_name]
    start = time.perf_counter()
    critic, curve = train_critic(family, est, mi, settings)
    values = evaluate(critic, est, mi, settings)
    return {
        "family": family,
        "estimator": est_name,
        "true_mi": mi,
        "rho": rho_for_mi(mi, settings.dim),
        "seconds": time.perf_counter() - start,
        "train_curve": curve,
        "estimates": {name: {**summarise(v), "values": v} for name, v in values.items()},
    }


def run_grid(settings: Settings) -> list[dict[str, object]]:
    """Every (family, estimator, MI level) not in ``settings.skipped``, in a fixed order."""
    runs = []
    for family in settings.families:
        for est in settings.estimators:
            if f"{family}/{est}" in settings.skipped:
                continue
            for mi in settings.mi_levels:
                runs.append(run_one(family, est, mi, settings))
                r = runs[-1]
                means = ", ".join(f"{k} {v['mean']:.3f}" for k, v in r["estimates"].items())
                print(f"{family:9s} {est:6s} MI {mi:5.2f}: {means}  ({r['seconds']:.1f} s)", flush=True)
    return runs


# --------------------------------------------------------------------------------------------- reporting
def table(runs: list[dict[str, object]], family: str) -> dict[str, dict[float, dict[str, float]]]:
    """``{column: {true MI: summary}}`` of one critic family."""
    out: dict[str, dict[float, dict[str, float]]] = {}
    for r in runs:
        if r["family"] == family:
            for col, summary in r["estimates"].items():
                out.setdefault(col, {})[r["true_mi"]] = summary
    return out


def markdown_table(tab: dict[str, dict[float, dict[str, float]]], levels: tuple[float, ...]) -> list[str]:
    cols = [(c, label) for c, _, label in COLUMNS if c in tab]
    head = "| true MI | " + " | ".join(label for _, label in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    for mi in levels:
        cells = [f"{tab[c][mi]['mean']:.2f} ± {tab[c][mi]['std']:.2f}" for c, _ in cols]
        lines.append(f"| {mi:g} | " + " | ".join(cells) + " |")
    return lines


def is_monotone(tab: dict[str, dict[float, dict[str, float]]], col: str) -> bool:
    means = [tab[col][mi]["mean"] for mi in sorted(tab[col])]
    return all(b > a for a, b in zip(means, means[1:]))


def saturation_text(tab: dict[str, dict[float, dict[str, float]]]) -> str:
    """For each infoNCE column: top estimate vs log(K+1) and the first MI level within 0.1 of the ceiling."""
    parts = []
    for col in ("nce16", "nce128", "nce512"):
        if col not in tab:
            continue
        ceil, levels = CEILINGS[col], sorted(tab[col])
        near = [mi for mi in levels if tab[col][mi]["mean"] >= ceil - 0.1]
        top = max(tab[col][mi]["mean"] for mi in levels)
        where = f"within 0.1 of it from true MI {near[0]:g} on" if near else "never within 0.1 of it"
        parts.append(f"K+1={round(math.exp(ceil))}: highest {top:.2f} vs log(K+1) = {ceil:.2f}, {where}")
    return "; ".join(parts)


def dv_text(tab: dict[str, dict[float, dict[str, float]]]) -> str:
    """DV's spread at a moderate and at the top MI, where it lands above the truth, the pool and IS values."""
    dv, pool, imp = tab["dv"], tab["dv_pool"], tab["dv_is"]
    hi = max(dv)
    mid = min((mi for mi in dv if mi > 0), default=hi)
    above = [mi for mi in sorted(dv) if dv[mi]["mean"] > mi + 0.05]
    text = (
        f"in-batch DV {dv[mid]['mean']:.2f} ± {dv[mid]['std']:.2f} at true MI {mid:g}, "
        f"{dv[hi]['mean']:.2f} ± {dv[hi]['std']:.2f} at {hi:g} (std ×{dv[hi]['std'] / dv[mid]['std']:.1f}, "
        f"batch range {dv[hi]['min']:.1f} to {dv[hi]['max']:.1f})"
    )
    if above:
        text += ", above the truth at MI " + ", ".join(
            f"{mi:g} ({dv[mi]['mean']:.2f}; pool {pool[mi]['mean']:.2f}; IS {imp[mi]['mean']:.2f})"
            for mi in above
        )
    else:
        text += ", never above the truth"
    gaps = {mi: imp[mi]["mean"] - mi for mi in imp}
    lo, hi_gap = min(gaps, key=gaps.get), max(gaps, key=gaps.get)
    side = "never above the truth" if gaps[hi_gap] <= 0.05 else f"above the truth at MI {hi_gap:g}"
    return text + (
        f"; the same critics' importance-sampled DV (their actual DV bound) is {side}: IS − truth runs from "
        f"{gaps[lo]:+.2f} (MI {lo:g}) to {gaps[hi_gap]:+.2f} (MI {hi_gap:g})"
    )


def jsd_text(tab: dict[str, dict[float, dict[str, float]]]) -> str:
    """Whether the JSD bound and each read-out of the JSD critic increase with the true MI."""
    hi = max(tab["jsd"])
    cols = [c for c in ("jsd", "jsd_dv", "jsd_nce128", "jsd_dv_is") if c in tab]
    order = ", ".join(f"{c} {'monotone' if is_monotone(tab, c) else 'NOT monotone'}" for c in cols)
    return (
        f"bound {tab['jsd'][hi]['mean']:.2f} at {hi:g} nats (ceiling log 4 = {LOG4:.2f}); ordering of the MI "
        f"levels: {order}; its critic's in-batch DV "
        + ", ".join(f"{tab['jsd_dv'][mi]['mean']:.2f}" for mi in sorted(tab["jsd"]))
        + "; IS DV "
        + ", ".join(f"{tab['jsd_dv_is'][mi]['mean']:.2f}" for mi in sorted(tab["jsd"]))
    )


def findings(runs: list[dict[str, object]], settings: Settings) -> list[str]:
    """The "what it shows" bullets, one block per critic family, written from the measured means."""
    lines = []
    for family in settings.families:
        tab = table(runs, family)
        if not tab:
            continue
        zero = min(settings.mi_levels)
        worst = max((abs(tab[c][zero]["mean"]), c) for c in tab)
        sign = "all on the low side" if max(tab[c][zero]["mean"] for c in tab) <= 0.05 else "not all low"
        lines.append(
            f"- **{family}** — at true MI {zero:g} the largest |estimate| is {worst[0]:.2f} ({worst[1]}), "
            f"{sign}."
        )
        if any(c in tab for c in ("nce16", "nce128", "nce512")):
            lines.append(f"  Saturation: {saturation_text(tab)}.")
        if "dv" in tab:
            lines.append(f"  DV: {dv_text(tab)}.")
        if "jsd" in tab:
            lines.append(f"  JSD: {jsd_text(tab)}.")
    return lines


def write_markdown(
    path: Path, runs: list[dict[str, object]], settings: Settings, meta: dict[str, object]
) -> None:
    load = " ".join(f"{x:.2f}" for x in meta["load_average_start"])
    setup = (
        f"Generated by `benchmarks/bench_mi_estimators.py` (seed {settings.seed}, {settings.steps} Adam "
        f"steps per critic, lr {settings.lr:g} cosine-decayed, d = {settings.dim}, batch 128 (512 for "
        "infoNCE K+1=512), fresh samples every step). Each cell: mean ± std of the estimate over "
        f"{settings.eval_batches} fresh held-out batches, in nats. Wall time {meta['wall_s'] / 60:.1f} min "
        f"on {meta['threads']} CPU thread (shared machine, load average at start {load})."
    )
    columns = (
        "Columns: *JSD bound* is the library's `jsd_bound(..., shift=True)` (one derangement negative per "
        "positive, MIMKD's layout), an estimate of 2·JS divergence, not of MI; *JSD critic → DV / "
        "infoNCE* are MI estimates computed from the JSD-trained critic's scores; *in-batch* DV uses all "
        "B(B−1) = 16256 other pairs of the held-out batch as negatives (the training layout), *pool* the "
        f"same positives against {settings.pool} fresh independent pairs, *IS* the same positives with "
        f"log E_q[e^T] importance-sampled from {settings.pool} pairs, half joint and half product, weighted "
        "by the known density ratio (an accurate value of the critic's actual DV bound, which cannot exceed "
        "the MI). "
        f"Ceilings: log 4 = {LOG4:.2f}, "
        f"log 16 = {math.log(16):.2f}, log 128 = {math.log(128):.2f}, log 512 = {math.log(512):.2f}."
    )
    lines = ["# MI estimators on correlated Gaussians of known MI", "", setup, "", columns, ""]
    for family in settings.families:
        tab = table(runs, family)
        if tab:
            lines += [f"## {FAMILY_LABELS[family]}", "", *markdown_table(tab, settings.mi_levels), ""]
    if settings.skipped:
        lines += ["Not run: " + "; ".join(f"`{k}` ({why})" for k, why in settings.skipped.items()) + ".", ""]
    lines += ["## What it shows (from the numbers above)", "", *findings(runs, settings), ""]
    lines += ["![estimate vs truth](" + path.with_suffix(".png").name + ")", ""]
    path.write_text("\n".join(lines))


def annotate_off_chart(
    ax: object, tab: dict[str, dict[float, dict[str, float]]], colors: dict, limits: tuple[float, float]
) -> None:
    """Write the value of every mean outside the y-range at the edge it leaves through."""
    for col, by_mi in tab.items():
        for mi, t in by_mi.items():
            if not limits[0] <= t["mean"] <= limits[1]:
                y = limits[0] + 0.4 if t["mean"] < limits[0] else limits[1] - 0.6
                ax.annotate(f"{t['mean']:.1f}", (mi, y), color=colors[col], fontsize=8, ha="center")


def plot(path: Path, runs: list[dict[str, object]], settings: Settings) -> None:
    """Estimate vs truth, one panel per critic family: y = x, the log(K+1) and log 4 ceilings dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams = [f for f in settings.families if table(runs, f)]
    fig, axes = plt.subplots(1, len(fams), figsize=(6.5 * len(fams), 5.2), squeeze=False)
    colors = dict(zip([c for c, _, _ in COLUMNS], plt.get_cmap("tab10").colors))
    top = max(settings.mi_levels)
    for ax, family in zip(axes[0], fams):
        tab = table(runs, family)
        ax.plot([0, top], [0, top], color="black", lw=1, label="truth (y = x)")
        for col, _, label in COLUMNS:
            if col in tab and col != "jsd_nce128":
                mis = sorted(tab[col])
                mean = [tab[col][m]["mean"] for m in mis]
                std = [tab[col][m]["std"] for m in mis]
                ax.errorbar(mis, mean, yerr=std, marker="o", ms=3, capsize=2, color=colors[col], label=label)
        for col, ceil in CEILINGS.items():
            if col in tab:
                ax.axhline(ceil, color=colors[col], ls="--", lw=0.8)
        highest = max(t["mean"] + t["std"] for c in tab for t in tab[c].values())
        limits = (-1.0, min(max(top + 1.0, highest + 0.5), 2.2 * top))
        ax.set_ylim(*limits)
        annotate_off_chart(ax, tab, colors, limits)
        ax.set(title=FAMILY_LABELS[family], xlabel="true MI (nats)", ylabel="estimate (nats)")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1000, help="Adam steps per critic (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", type=Path, default=Path("results/mi_estimators"), help="writes OUT.md/.json/.png"
    )
    ap.add_argument("--quick", action="store_true", help="3 MI levels, 200 steps, 5 held-out batches")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    load_start = list(os.getloadavg())
    settings = Settings(steps=args.steps, seed=args.seed)
    if args.quick:
        settings = Settings(steps=200, seed=args.seed, mi_levels=(0.0, 4.0, 10.0), eval_batches=5, pool=8192)
    start = time.perf_counter()
    runs = run_grid(settings)
    meta = {
        "wall_s": time.perf_counter() - start,
        "load_average_start": load_start,
        "load_average_end": list(os.getloadavg()),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "settings": asdict(settings),
        "estimators": {k: asdict(v) for k, v in ESTIMATORS.items()},
        "columns": [{"column": c, "trained_by": by, "label": label} for c, by, label in COLUMNS],
        "ceilings": CEILINGS,
        "meta": meta,
        "runs": runs,
    }
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    write_markdown(args.out.with_suffix(".md"), runs, settings, meta)
    plot(args.out.with_suffix(".png"), runs, settings)
    print(f"wrote {args.out}.md/.json/.png in {meta['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
