"""The ``mimkd sweep`` and ``mimkd report`` subcommands (wired into :mod:`mimkd.cli`)."""

from __future__ import annotations

import argparse

__all__ = ["register_cli"]


def cmd_sweep(a: argparse.Namespace) -> int:
    from .sweep import sweep

    res = sweep(
        a.file,
        seeds=a.seeds,
        out=a.out,
        teachers_dir=a.teachers,
        shard=a.shard,
        stage=a.stage,
        dry_run=a.dry_run,
        jobs=a.jobs,
        threads=a.threads,
        progress=a.progress,
    )
    if a.dry_run:
        return 0
    print(f"{res['runs']} runs in {res['out']}; {res['failed']} failed. Next: mimkd report {res['out']}")
    return 1 if res["failed"] else 0


def cmd_report(a: argparse.Namespace) -> int:
    from pathlib import Path

    from .report import report

    if (Path(a.dir) / "metrics.jsonl").exists() and not (Path(a.dir) / "sweep.json").exists():
        return _report_run(Path(a.dir), a)

    path = report(
        a.dir,
        compare_published=a.compare_published,
        out=a.out,
        plots=not a.no_plots,
        measure_latency=not a.no_latency,
    )
    print(path.read_text())
    print(f"wrote {path} (+ report.json and PNGs beside it)")
    return 0


def _report_run(run_dir, a: argparse.Namespace) -> int:
    """``mimkd report RUN_DIR``: one run's curves (and its gradient diagnostics when it logged them)."""
    from .grad_plots import epoch_records, grad_table, run_curves

    out = run_dir / "curves.png" if a.out is None else _out_dir(a.out) / f"{run_dir.name}_curves.png"
    path = None if a.no_plots else run_curves(run_dir, out)
    table = grad_table(epoch_records(run_dir))
    if table:
        print("each term's gradient on the student: norm ratio to cross-entropy's / cosine with it\n")
        print(table + "\n")
    if path is not None:
        print(f"wrote {path}")
    return 0


def _out_dir(out: str):
    from pathlib import Path

    p = Path(out)
    p.mkdir(parents=True, exist_ok=True)
    return p


def register_cli(sub: argparse._SubParsersAction) -> None:
    """Add ``sweep`` and ``report`` to the ``mimkd`` command's subparsers."""
    s = sub.add_parser(
        "sweep",
        help="run a study (a paper table or grid, configs/): pairs x methods x seeds, resumable, shardable",
        description="Expand a study file (configs/README.md) into run directories OUT/STUDY/...: teachers "
        "first, then every student run; finished runs are skipped, interrupted ones resumed.",
    )
    s.add_argument("file", help="study YAML, e.g. configs/fashion_mnist/table1.yaml")
    s.add_argument("--seeds", type=int, help="seeds 0..N-1 (default: the file's seeds:)")
    s.add_argument("--out", default="runs", help="directory holding study directories (default: runs)")
    s.add_argument("--teachers", help="directory the study's teacher checkpoint paths are relative to")
    s.add_argument("--shard", help="I/N: only the I-th of N shares of the student runs (1-based)")
    s.add_argument(
        "--stage",
        choices=["all", "teachers"],
        default="all",
        help="teachers: only train the teachers the study trains (do it once before sharded sweeps)",
    )
    s.add_argument("--dry-run", action="store_true", help="list the runs and their state; run nothing")
    s.add_argument("--jobs", type=int, help="runs in parallel (default: CPU cores)")
    s.add_argument("--threads", type=int, help="torch threads per run (default: cores / jobs)")
    s.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    s.set_defaults(fn=cmd_sweep)

    r = sub.add_parser(
        "report",
        help="a study's table (mean ± std over seeds, last and best epoch, vs published) and plots",
    )
    r.add_argument(
        "dir", help="a study directory written by mimkd sweep (OUT/STUDY), or one run directory (its curves)"
    )
    r.add_argument("--compare-published", action="store_true", help="add the published numbers and deltas")
    r.add_argument("--out", help="directory for report.md, report.json and PNGs (default: DIR)")
    r.add_argument("--no-plots", action="store_true")
    r.add_argument("--no-latency", action="store_true", help="do not measure the students' CPU latency")
    r.set_defaults(fn=cmd_report)
