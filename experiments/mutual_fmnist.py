"""DML and DCM beside two independently trained networks, on the Fashion-MNIST stand-in (no teacher).

    python experiments/mutual_fmnist.py [--pairs conv4mp_w32/conv4mp_w32] [--seeds 3] [--epochs 15]

Protocol: the demo's student recipe (``fashion_mnist`` preset: SGD lr 0.05, cosine, batch 64), a stratified
10 % of the training set (6,000 images), 15 epochs, full test set. The default pair is two of the demo's
students (conv4mp_w32; DCM's heads re-implement its remaining conv blocks, see mimkd.distillers.dcm_heads).
For each pair A/B:

* ``independent``: A and B each trained alone (``vanilla``), seeds 0..N-1 (for A = B one set of runs gives
  both columns: two independently trained networks of that architecture; for the demo's student these are
  the demo's vanilla runs, copied when present);
* ``dml``: A and B trained together with DML (docs/methods/dml.md); ``dcm``: with DCM (docs/methods/dcm.md,
  auxiliary classifiers by the placement rule, 18 cross-network KL terms), seeds 0..N-1.

Writes ``results/mutual_fmnist.md`` (and ``.json``, ``.png``): mean ± std over seeds of each network's
last- and best-epoch test top-1. Stand-in scale: not the paper's CIFAR-100 numbers.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

FRACTION = 0.1


def _config(method: str, arch: str, seed: int, out: Path, epochs: int, options: dict) -> dict[str, Any]:
    return {
        "seed": seed,
        "out_dir": str(out / "runs"),
        "name": f"{method}_{arch}_s{seed}" if not options else f"{method}_{arch}_{options['_tag']}_s{seed}",
        "data": {"name": "fashion_mnist", "train_fraction": FRACTION},
        "student": {"arch": arch},
        "method": {"name": method, **{k: v for k, v in options.items() if not k.startswith("_")}},
        "optim": {"recipe": "fashion_mnist", "epochs": epochs},
        "train": {"progress": False},
    }


def _network_top1(summary: dict[str, Any], index: int, which: str) -> float | None:
    if index == 0 and "networks" not in summary:
        return summary[which]["top1"]
    nets = list(summary.get("networks", {}).values())
    return (nets[index].get(which) or {}).get("top1") if index < len(nets) else None


def main() -> None:
    from mimkd.allocator import reexec_with_tcmalloc

    reexec_with_tcmalloc([__file__, *sys.argv[1:]])
    from runner import mean_std, run_configs, write_report

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="conv4mp_w32/conv4mp_w32", help="comma-separated A/B pairs")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", default="runs/mutual_fmnist")
    ap.add_argument("--results", default="results/mutual_fmnist")
    args = ap.parse_args()
    out = Path(args.out)
    pairs = [tuple(p.split("/")) for p in args.pairs.split(",")]
    demo = Path("runs/demo/runs")
    for s in range(args.seeds):  # the demo's vanilla runs are this protocol's independent conv4mp_w32 runs
        src, dst = demo / f"vanilla_s{s}", out / "runs" / f"vanilla_conv4mp_w32_s{s}"
        if src.is_dir() and not dst.exists():
            shutil.copytree(src, dst)

    jobs: list[tuple[str, dict]] = []
    for a, b in pairs:
        for arch in dict.fromkeys((a, b)):
            for s in range(args.seeds):
                jobs.append((f"alone:{arch}", _config("vanilla", arch, s, out, args.epochs, {})))
        for method, opts in (("dml", {"peers": [b]}), ("dcm", {"peer": b})):
            opts = {**opts, "_tag": f"with_{b}"}
            for s in range(args.seeds):
                jobs.append((f"{method}:{a}/{b}", _config(method, a, s, out, args.epochs, opts)))
    # the slowest runs first: better packing on the workers
    jobs.sort(key=lambda j: {"dcm": 0, "dml": 1}.get(j[0].split(":")[0], 2))
    summaries = run_configs(jobs, args.workers, desc="mutual-learning runs")

    rows = []
    for a, b in pairs:
        alone_a = [s for s in summaries[f"alone:{a}"] if s.get("status") == "finished"]
        alone_b = [s for s in summaries[f"alone:{b}"] if s.get("status") == "finished"]
        rows.append(_row("independent", a, b, alone_a, alone_b))
        for method in ("dml", "dcm"):
            runs = [s for s in summaries[f"{method}:{a}/{b}"] if s.get("status") == "finished"]
            rows.append(_row(method, a, b, runs, runs, second=1))

    base = {(r["pair"]): r for r in rows if r["method"] == "independent"}
    lines = [
        f"Fashion-MNIST stand-in, no teacher: networks trained on {FRACTION:.0%} of the training set, "
        f"{args.epochs} epochs, {args.seeds} seeds (mean ± std of test top-1 %). Stand-in scale, not the "
        "paper's CIFAR-100 numbers.",
        "",
        "| pair A / B | method | A last | B last | A best | B best | gain A / B (last) | s/run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref = base[r["pair"]]
        gains = "/".join(
            f"{_mean(r[k]) - _mean(ref[k]):+.2f}" if r[k] and ref[k] else "-" for k in ("a_last", "b_last")
        )
        lines.append(
            f"| {r['pair']} | {r['method']} | {mean_std(r['a_last'])} | {mean_std(r['b_last'])} | "
            f"{mean_std(r['a_best'])} | {mean_std(r['b_best'])} | {gains} | {r['seconds']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    results = write_report(args.results, text, {"rows": rows, "args": vars(args)})
    _plot(rows, results.with_suffix(".png"), args)


def _mean(v: list[float]) -> float:
    return sum(v) / len(v)


def _row(method: str, a: str, b: str, runs_a: list, runs_b: list, second: int = 0) -> dict[str, Any]:
    def vals(runs: list, index: int, which: str) -> list[float]:
        return [x for x in (_network_top1(s, index, which) for s in runs) if x is not None]

    secs = [s.get("wall_time_s", 0.0) for s in runs_a]
    return {
        "pair": f"{a} / {b}",
        "method": method,
        "a_last": vals(runs_a, 0, "last"),
        "b_last": vals(runs_b, second, "last"),
        "a_best": vals(runs_a, 0, "best"),
        "b_best": vals(runs_b, second, "best"),
        "seconds": sum(secs) / len(secs) if secs else 0.0,
    }


def _plot(rows: list[dict[str, Any]], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4))
    for i, r in enumerate(rows):
        for j, (key, colour) in enumerate((("a_last", "#4c72b0"), ("b_last", "#dd8452"))):
            v = r[key]
            if not v:
                continue
            x = i + (j - 0.5) * 0.36
            ax.bar(
                x,
                _mean(v),
                width=0.34,
                color=colour,
                alpha=0.85,
                label=("net A", "net B")[j] if i == 0 else None,
            )
            ax.scatter([x] * len(v), v, color="black", s=10, zorder=3)
    ax.set_xticks(range(len(rows)), [f"{r['method']}\n{r['pair']}" for r in rows], fontsize=8)
    vals = [v for r in rows for k in ("a_last", "b_last") for v in r[k]]
    if vals:
        ax.set_ylim(min(vals) - 1.0, max(vals) + 0.6)
    ax.set_ylabel("test top-1 (%), last epoch")
    ax.set_title(f"Mutual learning on {FRACTION:.0%} of Fashion-MNIST, {args.seeds} seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
