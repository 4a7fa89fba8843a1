"""``mimkd sweep``: run a study file (pairs × methods × seeds), resumable and shardable."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def command(a: argparse.Namespace) -> int:
    from mimkd.experiments.sweep import sweep

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


def register(sub: argparse._SubParsersAction) -> None:
    """Add the command to the ``mimkd`` subparsers."""
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
    s.set_defaults(fn=command)
