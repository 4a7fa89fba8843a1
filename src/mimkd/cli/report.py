"""``mimkd report``: a study's table and plots, or one run's curves and gradient diagnostics."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register"]


def command(a: argparse.Namespace) -> int:
    from mimkd.experiments.report import report

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
    from mimkd.experiments.grad_plots import epoch_records, grad_table, run_curves

    out = run_dir / "curves.png" if a.out is None else _out_dir(a.out) / f"{run_dir.name}_curves.png"
    path = None if a.no_plots else run_curves(run_dir, out)
    table = grad_table(epoch_records(run_dir))
    if table:
        print("each term's gradient on the student: norm ratio to cross-entropy's / cosine with it\n")
        print(table + "\n")
    if path is not None:
        print(f"wrote {path}")
    return 0


def _out_dir(out: str) -> Path:
    p = Path(out)
    p.mkdir(parents=True, exist_ok=True)
    return p


def register(sub: argparse._SubParsersAction) -> None:
    """Add the command to the ``mimkd`` subparsers."""
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
    r.set_defaults(fn=command)
