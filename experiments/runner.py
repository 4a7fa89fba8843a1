"""Run a list of run configurations in parallel on the CPU cores, skipping finished runs, resuming others.

Shared by the stand-in experiments of this directory (imported as a sibling module when a script runs).
Every run is an ordinary mimkd run directory; results are read back from each ``summary.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from mimkd.experiments.pool import Job, finished_summary, mean_std_of, run_jobs

__all__ = ["run_configs", "mean_std", "teacher_checkpoint", "write_report"]


def run_configs(
    jobs: list[tuple[str, dict[str, Any]]], workers: int | None = None, desc: str = "runs"
) -> dict[str, list[dict[str, Any]]]:
    """Run ``(row, config dict)`` jobs (finished ones are read back); returns the summaries per row."""
    batch = [
        Job(row, cfg, done=finished_summary(Path(cfg["out_dir"]) / cfg["name"], cfg["optim"]["epochs"]))
        for row, cfg in jobs
    ]
    out: dict[str, list[dict[str, Any]]] = {row: [] for row, _ in jobs}
    for job, summary in run_jobs(batch, workers, desc=desc):
        out[job.tag].append(summary)
    for row, runs in out.items():
        for s in runs:
            if s.get("status") == "failed":
                print(f"a {row} run failed: {s.get('error')}", file=sys.stderr)
    return out


def mean_std(values: list[float]) -> str:
    if not values:
        return "N/A"
    m, s = mean_std_of(values)
    return f"{m:.2f} ± {s:.2f}"


def teacher_checkpoint(cache_dir: str | None = None) -> Path:
    """The demo's cached Fashion-MNIST teacher (trained once by ``mimkd demo``; trained here if missing)."""
    from mimkd.demo import DEMO, _train_teacher

    cache = Path(cache_dir or os.environ.get("MIMKD_CACHE") or Path.home() / ".cache" / "mimkd")
    ckpt, _ = _train_teacher(cache, None, DEMO["teacher"]["epochs"], 1.0)
    return ckpt


def write_report(results: str | Path, text: str, payload: dict[str, Any]) -> Path:
    """Print the markdown table and write it to ``RESULTS.md`` with ``payload`` as ``RESULTS.json``."""
    print("\n" + text)
    path = Path(results)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".md").write_text(text)
    path.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path.with_suffix('.md')}")
    return path
