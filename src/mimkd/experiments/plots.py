"""The report's pictures: training curves, ablation contours (MIMKD Fig. 3 layout), accuracy vs latency.

Each function writes PNGs into ``dest`` and returns their paths (none when the study has nothing to draw).
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from .pool import mean_std_of
from .study import Study

__all__ = ["training_curves", "term_gradient_plots", "ablation_contours", "accuracy_vs_latency"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text)


def training_curves(study: Study, records: list, dest: Path) -> list[Path]:
    """Test top-1 against epoch per pair: the mean over seeds of every row (grid points left out)."""
    plt = _plt()
    paths = []
    for pair in study.pair_labels():
        lines = {}
        for row in study.spec.methods:
            runs = [
                r for r in records if r.kind == "student" and pair in r.pairs and r.row == row and not r.point
            ]
            curves = [dict(r.curve) for r in runs if r.ok and r.curve]  # finished runs only
            if not curves:
                continue
            epochs = sorted(set.intersection(*(set(c) for c in curves)))
            lines[row] = (epochs, [mean_std_of([c[e] for c in curves])[0] for e in epochs])
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for row, (x, y) in lines.items():
            ax.plot(x, y, marker="o", markersize=2.5, linewidth=1.3, label=row)
        ax.set_xlabel("epoch")
        ax.set_ylabel("test top-1 (%)")
        ax.set_title(f"{study.name}: {pair} (mean over seeds)")
        lo = min(min(y[len(y) // 3 :] or y) for _, y in lines.values())
        ax.set_ylim(bottom=max(0.0, lo - 2.0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        path = dest / f"curves_{_safe(pair)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def term_gradient_plots(study: Study, records: list, dest: Path) -> list[Path]:
    """Per pair, each row's per-term gradient ratio and cosine to CE against epoch (mean over seeds), when
    its runs logged them (``train.log_term_grads``)."""
    from .grad_plots import plot_term_gradients

    paths = []
    for pair in study.pair_labels():
        groups = {
            row: [r.run_dir for r in records if r.kind == "student" and pair in r.pairs and r.row == row
                  and not r.point and r.ok and r.run_dir is not None]
            for row in study.spec.methods
        }  # fmt: skip
        path = plot_term_gradients(
            {k: v for k, v in groups.items() if v},
            dest / f"term_grads_{_safe(pair)}.png",
            f"{study.name}: {pair}, each term's gradient on the student vs cross-entropy's (mean over seeds)",
        )
        if path is not None:
            paths.append(path)
    return paths


def ablation_contours(study: Study, entries: list[dict[str, Any]], dest: Path) -> list[Path]:
    """For every pair of numeric grid keys: contours of last-epoch accuracy, one panel per value of the
    remaining key(s) held fixed (the MIMKD paper's Fig. 3: pairs of λ's, the third fixed)."""
    keys = [
        k for k, v in study.spec.grid.items() if len(v) > 1 and all(isinstance(x, (int, float)) for x in v)
    ]
    if len(keys) < 2:
        return []
    plt = _plt()
    import numpy as np

    paths = []
    grid_entries = [e for e in entries if e["point"] and e["last"]]
    for pair, row in {(e["pair"], e["row"]) for e in grid_entries}:
        acc = {
            tuple(e["point"][k] for k in keys): e["last"][0]
            for e in grid_entries
            if (e["pair"], e["row"]) == (pair, row)
        }
        lo, hi = min(acc.values()), max(acc.values())
        for a, b in itertools.combinations(keys, 2):
            rest = [k for k in keys if k not in (a, b)]
            fixed_values = list(itertools.product(*(study.spec.grid[k] for k in rest)))
            xs, ys = study.spec.grid[a], study.spec.grid[b]
            fig, axes = plt.subplots(
                1, len(fixed_values), figsize=(3.6 * len(fixed_values) + 0.8, 3.4), squeeze=False
            )
            im = None
            for ax, fixed in zip(axes[0], fixed_values):
                z = np.full((len(ys), len(xs)), np.nan)
                for i, y in enumerate(ys):
                    for j, x in enumerate(xs):
                        point = dict(zip(rest, fixed)) | {a: x, b: y}
                        z[i, j] = acc.get(tuple(point[k] for k in keys), np.nan)
                levels = np.linspace(lo, hi, 12) if hi > lo else None
                if np.isfinite(z).sum() >= 4 and levels is not None:
                    im = ax.contourf(xs, ys, z, levels=levels, cmap="viridis")
                for i, y in enumerate(ys):
                    for j, x in enumerate(xs):
                        if np.isfinite(z[i, j]):
                            ax.text(
                                x, y, f"{z[i, j]:.1f}", ha="center", va="center", fontsize=6, color="white"
                            )
                ax.set_xlabel(_short(a))
                ax.set_ylabel(_short(b))
                ax.set_title(", ".join(f"{_short(k)}={v}" for k, v in zip(rest, fixed)) or "", fontsize=9)
            if im is not None:
                fig.colorbar(im, ax=axes[0].tolist(), label="last-epoch test top-1 (%)")
            fig.suptitle(f"{study.name}: {row}, {pair}", fontsize=10)
            path = dest / f"ablation_{_safe(row)}_{_short(a)}_{_short(b)}.png"
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            paths.append(path)
    return paths


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def accuracy_vs_latency(
    study: Study, entries: list[dict[str, Any]], latency: dict[str, dict[str, float]], dest: Path
) -> list[Path]:
    """Last-epoch accuracy against single-image CPU latency (1 thread | all threads) for every student and
    row; a figure only when the study has at least two student architectures."""
    points = [e for e in entries if e["last"] and not e["point"] and e["student"] in latency]
    if len({e["student"] for e in points}) < 2:
        return []
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4), sharey=True)
    rows = list(dict.fromkeys(e["row"] for e in points))
    markers = itertools.cycle("osD^vP*X")
    style = {row: next(markers) for row in rows}
    for ax, mode in zip(axes, ("1_thread", "all_threads")):
        for row in rows:
            mine = [e for e in points if e["row"] == row]
            x = [latency[e["student"]][mode] for e in mine]
            y = [e["last"][0] for e in mine]
            ax.scatter(x, y, marker=style[row], label=row, s=36)
        for student in {e["student"] for e in points}:
            best = max((e for e in points if e["student"] == student), key=lambda e: e["last"][0])
            ax.annotate(
                student,
                (latency[student][mode], best["last"][0]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.set_xscale("log")
        ax.set_xlabel(f"CPU latency, batch 1, {mode.replace('_', ' ')} (ms, median)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("last-epoch test top-1 (%)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{study.name}: accuracy vs single-image CPU latency", fontsize=10)
    fig.tight_layout()
    path = dest / "accuracy_vs_latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
