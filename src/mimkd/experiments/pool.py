"""Run many ordinary runs in parallel worker processes: finished runs are read back, interrupted ones resume.

Shared by ``mimkd sweep``, ``mimkd demo`` and the scripts in ``experiments/``. A job is a run configuration
(a dict, validated in the worker) plus optional follow-ups on the finished run (the linear probes of a study).
Workers are spawned processes, each with ``threads`` torch threads, so ``workers × threads`` should not exceed
the cores.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

__all__ = ["Job", "run_jobs", "finished_summary", "epochs_done", "run_one", "mean_std_of"]


def finished_summary(run_dir: Path, epochs: int) -> dict[str, Any] | None:
    """The run's ``summary.json`` when it finished all ``epochs`` or diverged (a rerun would repeat it)."""
    try:
        s = json.loads((Path(run_dir) / "summary.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if s.get("status") == "diverged":
        return s
    return s if s.get("status") == "finished" and s.get("epochs") == epochs else None


def epochs_done(run_dir: Path) -> int:
    try:
        with (Path(run_dir) / "metrics.jsonl").open() as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def run_one(
    cfg_dict: dict[str, Any],
    threads: int,
    after: Callable[[Path], dict[str, Any]] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Worker: one run, resumed if its directory holds an interrupted one (started over with ``overwrite``);
    then ``after(run_dir)``."""
    import torch

    from mimkd.config import build_config
    from mimkd.engine.setup import run
    from mimkd.errors import MimkdError, NonFiniteLossError, install_warning_format

    install_warning_format()  # a spawned worker: its mimkd warnings one line each, as in the CLI
    torch.set_num_threads(threads)
    cfg = build_config({**cfg_dict, "threads": threads})
    run_dir = Path(cfg.out_dir) / cfg.run_name()
    summary = None if overwrite else finished_summary(run_dir, int(cfg.resolved().optim.epochs))
    try:
        if summary is None:
            summary = run(cfg, resume=False, overwrite=True) if overwrite else run(cfg, resume="auto")
    except NonFiniteLossError as e:
        return {"status": "diverged", "error": str(e), "method": cfg.method.name}
    except MimkdError as e:
        return {"status": "failed", "error": str(e), "method": cfg.method.name}
    if after is not None and summary.get("status") == "finished":
        try:  # a failed follow-up (a probe) leaves the run finished: the next sweep retries the follow-up
            summary = {**summary, **after(run_dir)}
        except Exception as e:
            summary = {**summary, "followup_error": f"{type(e).__name__}: {e}"}
    return summary


class Job:
    """One run to do: its configuration, a tag for the caller, and an optional follow-up."""

    def __init__(
        self,
        tag: Any,
        config: dict[str, Any],
        after: Callable | None = None,
        done: dict[str, Any] | None = None,
        epochs: int | None = None,
        overwrite: bool = False,
    ) -> None:
        self.tag = tag
        self.overwrite = overwrite  # start the run over (e.g. its teacher changed)
        self._epochs = epochs
        self.config = config
        self.after = after
        self.done = done  # a summary when nothing is left to do

    @property
    def run_dir(self) -> Path:
        return Path(self.config["out_dir"]) / self.config["name"]

    @property
    def epochs(self) -> int:
        return int(self._epochs or self.config["optim"]["epochs"])


def run_jobs(
    jobs: list[Job],
    workers: int | None = None,
    threads: int | None = None,
    desc: str = "runs",
    progress: bool | None = None,
    on_result: Callable[[Job, dict[str, Any]], None] | None = None,
) -> list[tuple[Job, dict[str, Any]]]:
    """Run the jobs (``workers`` at a time, ``threads`` each); a progress bar counts epochs of all runs."""
    from tqdm.auto import tqdm

    cores = os.cpu_count() or 1
    workers = max(1, min(workers or cores, cores, max(len(jobs), 1)))
    threads = threads or max(1, cores // workers)
    results: list[tuple[Job, dict[str, Any]]] = []
    pending: dict[Future, Job] = {}
    show = sys.stderr.isatty() if progress is None else progress
    total = sum(j.epochs for j in jobs)
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for job in jobs:
            if job.done is not None:
                results.append((job, job.done))
            else:
                pending[pool.submit(run_one, job.config, threads, job.after, job.overwrite)] = job
        with tqdm(total=total, desc=desc, unit="epoch", disable=not show) as bar:
            while pending:
                for fut in [f for f in pending if f.done()]:
                    job = pending.pop(fut)
                    try:
                        summary = fut.result()
                    except Exception as e:  # a crash in the worker: report it, keep the others going
                        summary = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
                    results.append((job, summary))
                    if on_result is not None:
                        on_result(job, summary)
                bar.n = sum(min(epochs_done(j.run_dir), j.epochs) for j in jobs)
                bar.refresh()
                time.sleep(0.5)
    return results


def mean_std_of(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)
