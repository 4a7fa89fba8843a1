"""``mimkd demo``: the embedded default job — vanilla vs KD vs MIMKD vs MIMKD+KD on real data, in minutes on a
laptop CPU.

1. A ~0.9M-parameter teacher (``cnn_teacher``) is trained on all of Fashion-MNIST, or reused from the cache
   directory when an identical one was trained before.
2. A ~28k-parameter student (``conv4mp_w32``) is trained on a stratified 8 % of the training set (4,800
   images) for 20 epochs with ``vanilla``, ``kd``, ``mimkd`` and ``mimkd+kd``, three seeds each, several runs
   in parallel on the CPU cores. 20 epochs show every image 20 times, the least a memory bank's positives
   need (``docs/mimkd.md``), and MIMKD's K is 8 % of the training set, as 4,096 of CIFAR-100's 50,000.
3. A table (mean ± std of last- and best-epoch test accuracy) is printed and written with a bar chart.

Runs that end near chance accuracy (or stopped by a non-finite loss, or failed) are counted and left out of
the means, not averaged in. The cached teacher is locked while it trains: a second demo waits for it, then
reuses it.
Every run is an ordinary run directory: the demo resumes where it stopped if interrupted.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from mimkd.experiments.pool import Job, finished_summary, mean_std_of, run_jobs

__all__ = ["run_demo", "DEMO"]

#: The demo's protocol. Student recipe: the Fashion-MNIST stand-in preset (SGD, lr 0.05, cosine).
DEMO: dict[str, Any] = {
    "data": "fashion_mnist",
    "train_fraction": 0.08,
    # Trained without augmentation: for this short schedule that converges faster (measured: 92.5 % after 5
    # epochs, 93.0 % after 6, against 91.7 % / 91.9 % with crop + flip).
    "teacher": {
        "arch": "cnn_teacher",
        "epochs": 5,
        "batch_size": 128,
        "lr": 0.1,
        "warmup_epochs": 1,
        "augment": False,
    },
    "student": "conv4mp_w32",
    "student_epochs": 20,
    "methods": {
        "vanilla": {},
        "kd": {},  # RepDistiller's weights: 0.1 CE + 0.9 KD, T = 4
        # The paper's weights and estimators; the critics are narrowed from 512 to 32 channels to suit a
        # 28k-parameter student (measured on the fair stand-in: 32 and 128 wide end within 0.3 points, 512
        # is far slower; timings: results/dev_cpu_notes.md), and K = 393 is 8 % of the 4,800 images.
        "mimkd": {"critic_width": 32, "num_negatives": 393},
        # the same plus logit KD (CE 1, KD 1, T = 4): results/fair_fmnist/
        "mimkd+kd": {"critic_width": 32, "num_negatives": 393},
    },
}


def _teacher_config(cache_dir: Path, epochs: int, fraction: float) -> dict[str, Any]:
    t = DEMO["teacher"]
    cfg = {
        "seed": 0,
        "data": {"name": DEMO["data"], "train_fraction": fraction, "augment": t["augment"]},
        "student": {"arch": t["arch"]},
        "method": {"name": "vanilla"},
        "optim": {
            "recipe": "fashion_mnist",
            "epochs": epochs,
            "batch_size": t["batch_size"],
            "lr": t["lr"],
            "warmup_epochs": t["warmup_epochs"],
            "nesterov": True,
        },
    }
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]
    cfg["out_dir"] = str(cache_dir / "teachers")
    cfg["name"] = f"{t['arch']}_{DEMO['data']}_{key}"
    return cfg


def _student_config(
    method: str,
    seed: int,
    teacher_ckpt: Path,
    out_dir: Path,
    epochs: int,
    fraction: float,
    options: dict[str, Any],
) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "seed": seed,
        "out_dir": str(out_dir / "runs"),
        "name": f"{method}_s{seed}",
        "data": {"name": DEMO["data"], "train_fraction": fraction},
        "student": {"arch": DEMO["student"]},
        "method": {"name": method, **options},
        "optim": {"recipe": "fashion_mnist", "epochs": epochs},
        "train": {"progress": False, "eval_teacher": False},  # its accuracy is known from its own run
    }
    if method != "vanilla":
        cfg["teacher"] = {"arch": DEMO["teacher"]["arch"], "checkpoint": str(teacher_ckpt)}
    return cfg


_finished = finished_summary
_stats = mean_std_of


def summarise(summaries: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per method: mean ± sample std of last- and best-epoch top-1 over the runs that finished well; the
    others (near chance, diverged, failed, interrupted) are counted in ``excluded``, by outcome."""
    from mimkd.engine.summary import count_outcomes, run_outcome

    rows = []
    for method, runs in summaries.items():
        outcomes = [run_outcome(s) for s in runs]
        ok = [s for s, o in zip(runs, outcomes) if o == "ok"]
        last = [s["last"]["top1"] for s in ok]
        best = [s["best"]["top1"] for s in ok]
        rows.append(
            {
                "method": method,
                "runs": len(ok),
                "excluded": count_outcomes(outcomes),  # by outcome: left out of the means
                "last_mean": _stats(last)[0],
                "last_std": _stats(last)[1],
                "best_mean": _stats(best)[0],
                "best_std": _stats(best)[1],
                "last": last,
                "best": best,
                "seconds_per_run": _stats([s.get("wall_time_s", 0.0) for s in ok])[0],
            }
        )
    base = next((r for r in rows if r["method"] == "vanilla"), None)
    for r in rows:
        r["gain_vs_vanilla"] = r["last_mean"] - base["last_mean"] if base else float("nan")
    return rows


def format_table(rows: list[dict[str, Any]], header: str) -> str:
    from mimkd.engine.summary import describe_counts

    lines = [
        header,
        "",
        "| method | last epoch top-1 (%) | best epoch top-1 (%) | gain vs vanilla (last) | runs | s/run |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        excluded = describe_counts(r.get("excluded", {}))
        flag = f" ({excluded}: excluded)" if excluded else ""
        if not r["runs"]:
            lines.append(f"| {r['method']} | N/A | N/A | | 0{flag} | |")
            continue
        lines.append(
            f"| {r['method']} | {r['last_mean']:.2f} ± {r['last_std']:.2f} | {r['best_mean']:.2f} ± "
            f"{r['best_std']:.2f} | {r['gain_vs_vanilla']:+.2f} | {r['runs']}{flag} | "
            f"{r['seconds_per_run']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], teacher_acc: float | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["runs"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.75 * len(rows) + 2.0), 4))
    colours = {"vanilla": "#8c8c8c", "kd": "#4c72b0", "mimkd": "#c44e52"}
    for i, r in enumerate(rows):
        ax.bar(
            i,
            r["last_mean"],
            yerr=r["last_std"],
            capsize=6,
            color=colours.get(r["method"], "#55a868"),
            alpha=0.85,
        )
        ax.scatter([i] * len(r["last"]), r["last"], color="black", s=12, zorder=3)
        top = max([r["last_mean"] + r["last_std"], *r["last"]])
        ax.text(i, top + 0.12, f"{r['last_mean']:.2f}", ha="center", fontsize=9)
    if teacher_acc is not None:
        ax.axhline(teacher_acc, ls="--", color="black", lw=1)
        ax.text(len(rows) - 0.5, teacher_acc + 0.05, f"teacher {teacher_acc:.2f}", ha="right", fontsize=8)
    vals = [v for r in rows for v in r["last"]] + ([teacher_acc] if teacher_acc else [])
    if vals:
        ax.set_ylim(min(vals) - 1.0, max(vals) + 0.6)
    ax.set_xticks(range(len(rows)), [r["method"] for r in rows], rotation=30 if len(rows) > 6 else 0)
    ax.set_ylabel("test top-1 (%), last epoch")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _train_teacher(cache_dir: Path, progress: bool | None, epochs: int, fraction: float):
    """The cached teacher, trained first if needed. The cache entry's lock is held throughout: a second demo
    started meanwhile waits for this teacher and then reuses it, instead of training it a second time."""
    from mimkd.config import build_config
    from mimkd.engine.runlock import RunLock
    from mimkd.engine.setup import run

    cfg_dict = _teacher_config(cache_dir, epochs, fraction)
    run_dir = Path(cfg_dict["out_dir"]) / cfg_dict["name"]

    def waiting(pid: str) -> None:
        print(
            f"[demo] teacher: another mimkd process (PID {pid}) is training it in {run_dir}; waiting",
            flush=True,
        )

    with RunLock(run_dir).acquire(wait=True, on_wait=waiting):
        done = _finished(run_dir, epochs)
        if done:
            print(f"[demo] teacher: reusing {run_dir} (test top-1 {done['last']['top1']:.2f} %)")
            return run_dir / "last.pt", done
        print(
            f"[demo] teacher: training {DEMO['teacher']['arch']} on {fraction:.0%} of Fashion-MNIST for "
            f"{epochs} epochs (cached in {run_dir} for next time)",
            flush=True,
        )
        cfg_dict["train"] = {"progress": progress}
        summary = run(build_config(cfg_dict), resume="auto")
    print(f"[demo] teacher: test top-1 {summary['last']['top1']:.2f} % in {summary['wall_time_s']:.0f} s")
    return run_dir / "last.pt", summary


def _job(method: str, cfg: dict[str, Any], epochs: int) -> Job:
    """A demo run: read back when finished with the current teacher, started over when its teacher changed
    (e.g. the teacher cache was cleared and the teacher trained again)."""
    from mimkd.engine.identity import changed_teacher

    done = _finished(Path(cfg["out_dir"]) / cfg["name"], epochs)
    changed = changed_teacher(done, (cfg.get("teacher") or {}).get("checkpoint")) if done else None
    if changed:
        print(f"[demo] {cfg['name']}: {changed}; running it again", flush=True)
        return Job(method, cfg, overwrite=True)
    return Job(method, cfg, done=done)


def run_demo(
    out_dir: str = "runs/demo",
    cache_dir: str | None = None,
    seeds: int = 3,
    epochs: int | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    *,
    teacher_epochs: int | None = None,
    teacher_fraction: float = 1.0,
    train_fraction: float | None = None,
    methods: dict[str, dict[str, Any]] | None = None,
    plot_name: str = "demo.png",
    threads: int | None = None,
) -> dict:
    """Run the demo; returns the results dict also written to ``OUT/results.json``.

    ``teacher_epochs``, ``teacher_fraction`` and ``train_fraction`` shrink the protocol for smoke tests.
    ``methods`` (``{method: options}``, default the demo's vanilla/kd/mimkd) runs other methods on the same
    protocol (``experiments/baselines_fmnist.py``); a method with a ``runs_as`` key runs that registered
    method under this row name (e.g. two option sets of one method), and a ``train`` key (a dict) sets
    ``train.*`` options of that row's runs (e.g. ``log_term_grads``), an ``optim`` key ``optim.*`` options
    (e.g. a method's own learning rate). ``threads`` per run defaults to the
    cores divided by ``workers`` (two studies side by side: ``workers=1, threads=1`` each).
    """
    t0 = time.time()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir or os.environ.get("MIMKD_CACHE") or Path.home() / ".cache" / "mimkd")
    epochs = epochs or DEMO["student_epochs"]
    cores = os.cpu_count() or 1
    workers = max(1, min(workers or cores, cores))
    threads = threads or max(1, cores // workers)

    teacher_epochs = teacher_epochs or DEMO["teacher"]["epochs"]
    fraction = train_fraction or DEMO["train_fraction"]
    teacher_ckpt, teacher = _train_teacher(cache, progress, teacher_epochs, teacher_fraction)
    teacher_acc = teacher["last"]["top1"]
    t_teacher = time.time() - t0

    methods = dict(methods or DEMO["methods"])
    jobs = []  # last row first: mimkd, kd, vanilla for the demo (better packing on the workers)
    for method in reversed(list(methods)):
        opts = dict(methods[method])
        registered = opts.pop("runs_as", method)
        train, optim = opts.pop("train", {}), opts.pop("optim", {})
        for seed in range(seeds):
            cfg = _student_config(registered, seed, teacher_ckpt, out, epochs, fraction, opts)
            cfg["name"] = f"{method}_s{seed}"
            cfg["train"].update(train)
            cfg["optim"].update(optim)
            jobs.append((method, seed, cfg))
    print(
        f"[demo] students: {DEMO['student']} on {fraction:.0%} of Fashion-MNIST, "
        f"{epochs} epochs, methods {', '.join(methods)} x {seeds} seeds; {workers} parallel run(s) "
        f"x {threads} thread(s)",
        flush=True,
    )
    summaries: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    batch = [_job(method, cfg, epochs) for method, _, cfg in jobs]
    for job, summary in run_jobs(batch, workers, threads, desc="demo runs", progress=progress):
        summaries[job.tag].append(summary)
    for method, runs in summaries.items():
        for s in runs:
            if s.get("status") == "failed":
                print(f"[demo] a {method} run failed: {s.get('error')}", file=sys.stderr)
    rows = summarise(summaries)
    wall = time.time() - t0
    header = (
        f"Fashion-MNIST stand-in: teacher {DEMO['teacher']['arch']} ({teacher_acc:.2f} %) -> student "
        f"{DEMO['student']}, {fraction:.0%} of the training set, {epochs} epochs, "
        f"{seeds} seeds (mean ± std); demo wall time {wall / 60:.1f} min"
    )
    table = format_table(rows, header)
    print("\n" + table)
    title = f"{DEMO['student']} on {fraction:.0%} of Fashion-MNIST, {seeds} seeds, {epochs} epochs"
    plot(rows, teacher_acc, out / plot_name, title)
    results = {
        "protocol": DEMO
        | {
            "methods": methods,
            "student_epochs": epochs,
            "seeds": seeds,
            "train_fraction": fraction,
            "teacher": DEMO["teacher"] | {"epochs": teacher_epochs, "fraction": teacher_fraction},
        },
        "teacher": {
            "checkpoint": str(teacher_ckpt),
            "test_top1": teacher_acc,
            "train_seconds": teacher.get("wall_time_s"),
        },
        "rows": rows,
        "failures": {
            m: [s.get("error") for s in runs if s.get("status") == "failed"] for m, runs in summaries.items()
        },
        "wall_time_s": wall,
        "teacher_phase_s": t_teacher,
        "workers": workers,
        "threads_per_worker": threads,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(table + "\n")
    (out / "protocol.yaml").write_text(yaml.safe_dump(results["protocol"], sort_keys=False))
    print(f"\n[demo] table: {out / 'results.md'}   plot: {out / plot_name}   runs: {out / 'runs'}")
    return results
