"""``mimkd demo``: the embedded default distillation demo on Fashion-MNIST."""

from __future__ import annotations

import argparse

__all__ = ["register"]


def command(a: argparse.Namespace) -> int:
    from mimkd.demo import run_demo

    run_demo(
        out_dir=a.out,
        cache_dir=a.cache,
        seeds=a.seeds,
        epochs=a.epochs,
        workers=a.workers,
        progress=a.progress,
        teacher_epochs=a.teacher_epochs,
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the command to the ``mimkd`` subparsers."""
    m = sub.add_parser("demo", help="the embedded default: vanilla, kd, mimkd and mimkd+kd on Fashion-MNIST")
    m.add_argument("--out", default="runs/demo", help="where runs, table and plot go")
    m.add_argument("--cache", default=None, help="teacher cache directory (default: ~/.cache/mimkd)")
    m.add_argument("--seeds", type=int, default=3)
    m.add_argument("--epochs", type=int, default=None, help="student epochs (default: the demo's)")
    m.add_argument(
        "--teacher-epochs",
        type=int,
        default=None,
        help="teacher epochs, for shortened runs and CI (default: the demo's)",
    )
    m.add_argument("--workers", type=int, default=None, help="runs in parallel (default: CPU cores)")
    m.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    m.set_defaults(fn=command)
