"""Plots of the per-term gradient diagnostics (``train.log_term_grads``; :mod:`mimkd.engine.term_grads`).

* :func:`plot_term_gradients` — rows of runs (mean over seeds) against epoch: one column per loss term, its
  gradient's norm as a ratio of cross-entropy's (log scale) above, its cosine with cross-entropy's below.
  ``mimkd report`` draws it for a study whose runs logged the diagnostics; ``experiments/fair_fmnist.py``
  for MIMKD against MIMKD with its remedies.
* :func:`run_curves` — one run's curves: test top-1, every loss term and, when logged, the gradient ratios
  and cosines (``mimkd report RUN_DIR``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["epoch_records", "grad_terms", "plot_term_gradients", "run_curves", "grad_table"]


def epoch_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The main-training records of ``metrics.jsonl`` (init-stage records left out)."""
    out = []
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "epoch" in rec and "stage_index" not in rec:
            out.append(rec)
    return out


def grad_terms(records: list[dict[str, Any]]) -> list[str]:
    """The terms with gradient statistics in ``records`` (CE, the yardstick, left out)."""
    terms = {k.split(".")[1] for r in records for k in r if k.startswith("grad.") and k.endswith(".ratio_ce")}
    return sorted(terms - {"ce"})


def _mean_series(runs: list[list[dict[str, Any]]], key: str) -> tuple[list[int], list[float]]:
    by_epoch: dict[int, list[float]] = {}
    for recs in runs:
        for r in recs:
            if key in r:
                by_epoch.setdefault(int(r["epoch"]) + 1, []).append(float(r[key]))
    epochs = sorted(e for e, v in by_epoch.items() if len(v) == len(runs))
    return epochs, [sum(by_epoch[e]) / len(by_epoch[e]) for e in epochs]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_term_gradients(groups: dict[str, list[Path]], path: Path, title: str) -> Path | None:
    """``groups``: row label -> run directories (seeds). Writes ``path``; ``None`` when nothing was logged."""
    runs = {label: [epoch_records(d) for d in dirs] for label, dirs in groups.items()}
    runs = {label: [r for r in recs if grad_terms(r)] for label, recs in runs.items()}
    runs = {label: recs for label, recs in runs.items() if recs}
    terms = sorted({t for recs in runs.values() for r in recs for t in grad_terms(r)})
    if not terms:
        return None
    plt = _plt()
    fig, axes = plt.subplots(2, len(terms), figsize=(3.6 * len(terms) + 0.6, 6.2), squeeze=False)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {label: cycle[i % len(cycle)] for i, label in enumerate(runs)}  # one colour per row everywhere
    for col, term in enumerate(terms):
        for label, recs in runs.items():
            for row, stat in enumerate(("ratio_ce", "cos_ce")):
                x, y = _mean_series(recs, f"grad.{term}.{stat}")
                if x:
                    axes[row][col].plot(
                        x, y, marker="o", markersize=2, linewidth=1.2, label=label, color=colour[label]
                    )
        axes[0][col].set_title(term, fontsize=10)
        axes[0][col].set_yscale("log")
        axes[0][col].axhline(1.0, color="black", lw=0.7, ls="--")
        axes[1][col].axhline(0.0, color="black", lw=0.7, ls="--")
        axes[1][col].set_ylim(-1.05, 1.05)
        axes[1][col].set_xlabel("epoch")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("‖∇ term‖ / ‖∇ CE‖ (student)")
    axes[1][0].set_ylabel("cos(∇ term, ∇ CE)")
    legend: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="lower center", ncol=min(len(legend), 6), fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_curves(run_dir: str | Path, path: Path | None = None) -> Path | None:
    """One run's curves: test top-1, each loss term, and the gradient diagnostics when logged."""
    run_dir = Path(run_dir)
    recs = epoch_records(run_dir)
    if not recs:
        return None
    terms = grad_terms(recs)
    plt = _plt()
    ncols = 4 if terms else 2
    fig, axes = plt.subplots(1, ncols, figsize=(3.9 * ncols, 3.6))
    epochs = [int(r["epoch"]) + 1 for r in recs]
    acc = [(e, r["test.top1"]) for e, r in zip(epochs, recs) if "test.top1" in r]
    if acc:
        axes[0].plot(*zip(*acc), marker="o", markersize=2.5)
    axes[0].set_title("test top-1 (%)", fontsize=10)
    losses = sorted({k for r in recs for k in r if k.startswith("loss.") and k != "loss.total"})
    for k in losses:
        axes[1].plot(epochs, [r.get(k, float("nan")) for r in recs], label=k[5:])
    axes[1].set_title("weighted loss terms", fontsize=10)
    axes[1].legend(fontsize=7)
    for ax, stat, name in (
        (axes[2], "ratio_ce", "‖∇ term‖ / ‖∇ CE‖"),
        (axes[-1], "cos_ce", "cos(∇ term, ∇ CE)"),
    ):
        if not terms:
            break
        for t in terms:
            ax.plot(epochs, [r.get(f"grad.{t}.{stat}", float("nan")) for r in recs], label=t)
        ax.set_title(name, fontsize=10)
        ax.legend(fontsize=7)
    if terms:
        axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name, fontsize=10)
    fig.tight_layout()
    path = path or run_dir / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grad_table(records: list[dict[str, Any]]) -> str:
    """A markdown table of the gradient diagnostics at the first, middle and last logged epochs."""
    logged = [r for r in records if grad_terms([r])]
    if not logged:
        return ""
    picks = sorted({0, len(logged) // 2, len(logged) - 1})
    lines = ["| term | " + " | ".join(f"epoch {logged[i]['epoch'] + 1}: ratio / cos" for i in picks) + " |"]
    lines.append("|---|" + "---|" * len(picks))
    for t in grad_terms(logged):
        cells = [f"{logged[i].get(f'grad.{t}.ratio_ce', float('nan')):.3g} / " for i in picks]
        cells = [c + f"{logged[i].get(f'grad.{t}.cos_ce', float('nan')):+.2f}" for c, i in zip(cells, picks)]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
