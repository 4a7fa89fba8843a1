"""Run a list of run configurations in parallel on the CPU cores, skipping finished runs, resuming others.

Shared by the stand-in experiments of this directory (imported as a sibling module when a script runs).
Every run is an ordinary mimkd run directory; results are read back from each ``summary.json``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from mimkd.demo import _epochs_done, _finished, _run_one, _stats

__all__ = ["run_configs", "mean_std", "teacher_checkpoint", "write_report"]


def run_configs(
    jobs: list[tuple[str, dict[str, Any]]], workers: int | None = None, desc: str = "runs"
) -> dict[str, list[dict[str, Any]]]:
    """Run ``(row, config dict)`` jobs (finished ones are read back); returns the summaries per row."""
    from tqdm.auto import tqdm

    cores = os.cpu_count() or 1
    workers = max(1, min(workers or cores, cores))
    threads = max(1, cores // workers)
    out: dict[str, list[dict[str, Any]]] = {}
    pending = {}
    dirs, total = [], 0
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for row, cfg in jobs:
            out.setdefault(row, [])
            run_dir = Path(cfg["out_dir"]) / cfg["name"]
            epochs = cfg["optim"]["epochs"]
            dirs.append((run_dir, epochs))
            total += epochs
            done = _finished(run_dir, epochs)
            if done:
                out[row].append(done)
            else:
                pending[pool.submit(_run_one, cfg, threads)] = row
        with tqdm(total=total, desc=desc, unit="epoch", disable=not sys.stderr.isatty()) as bar:
            while pending:
                for fut in [f for f in pending if f.done()]:
                    out[pending.pop(fut)].append(fut.result())
                bar.n = sum(min(_epochs_done(d), e) for d, e in dirs)
                bar.refresh()
                time.sleep(0.5)
    for row, runs in out.items():
        for s in runs:
            if s.get("status") == "failed":
                print(f"a {row} run failed: {s.get('error')}", file=sys.stderr)
    return out


def mean_std(values: list[float]) -> str:
    if not values:
        return "N/A"
    m, s = _stats(values)
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
