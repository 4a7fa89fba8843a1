"""``mimkd bench``: images/s, peak memory and FLOP efficiency of a student step, a teacher forward and a
training step of each method, for one teacher → student pair and batch size (design.md, Speed).

Rows: ``student step`` (the ``vanilla`` distiller: forward, cross-entropy, backward, SGD step),
``teacher forward`` (eval mode, ``torch.inference_mode``) and one row per method (its main-stage step:
``build_distiller``, the cifar recipe's SGD over ``trainable_named_parameters()``, forward, sum of the
terms, backward, step). What a method needs before its main stage is done untimed: KDEP's offline pass runs
on synthetic batches; init stages (AB/FSP/FT, two-stage FitNets) are not run — their cost is a separate
phase, listed in the report. Inputs are synthetic uint8-range images of the data's shape, normalised, in
the trainer's memory format and already on the device: the loader is not measured. Memory-bank methods get
a bank of ``num_train`` rows and real-sized label tensors (balanced classes).

Per row: images/s (median over the timed steps of batch / step time, with quartiles, mean and std), ms per
step, FLOPs per image of one step (torch's ``FlopCounterMode``: forward + backward; the optimiser adds
none), achieved FLOP/s and its share of a measured fp32 matmul ceiling on the same device and threads, the
trainable parameters, a projected wall time (``epochs × images / images/s``), and peak memory: on CPU the
peak RSS (``ru_maxrss``) of a fresh subprocess that runs only that row, next to the RSS of that process
before it built anything; on CUDA ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
``max_batch`` (CUDA only) doubles each row's batch until it runs out of memory and measures the largest
batch that fitted.

The step timed is the trainer's own, :class:`mimkd.engine.step.TrainStep`, set up as ``Trainer`` sets it up
(non-finite check ``auto``: per step on CPU, deferred with a fused SGD on CUDA; ``precision`` fp32 or bf16
autocast; ``compile`` through ``compile_distiller``); a row whose loss turns non-finite is reported as an
error. ``benchmarks/bench_mimkd_speed.py`` and ``benchmarks/bench_baselines_speed.py`` time a similar step
with interleaved rounds and FLOP-normalised cost; they could call :func:`run_row` for their builds and
FLOP counts.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from .build import (
    STUDENT_ROW,
    TEACHER_ROW,
    BenchSetup,
    build_row,
    free_memory,
    sync,
)

__all__ = [
    "BenchSetup",
    "STUDENT_ROW",
    "TEACHER_ROW",
    "run_row",
    "run_row_isolated",
    "matmul_ceiling",
    "find_max_batch",
    "benchmark",
]

_CHILD_MARK = "MIMKD_BENCH_ROW "  # prefix of the one result line a row subprocess prints


# -- one row --------------------------------------------------------------------------------------------
def run_row(s: BenchSetup, row: str, batch: int | None = None) -> dict[str, Any]:
    """Build and measure ``row`` in this process (``STUDENT_ROW``, ``TEACHER_ROW`` or a method name).

    Returns batch, images/s statistics, ms/step, FLOPs per image, parameters and, on CUDA, the peak
    allocated memory of the row (weights, optimiser state, banks and activations)."""
    batch = batch or s.batch_size
    dev = torch.device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    free_memory(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    if s.compile:  # the FLOPs of an eager twin: a dispatch mode and the compiler do not mix
        eager, _ = build_row(s, row, batch, dev, use_compile=False)
        with FlopCounterMode(display=False) as fc:
            eager()
        del eager
        free_memory(dev)
        step, info = build_row(s, row, batch, dev)
        step()  # compiles
    else:
        step, info = build_row(s, row, batch, dev)
        with FlopCounterMode(display=False) as fc:  # one step counted (it is also the first warm-up step)
            step()
    flops = fc.get_total_flops() / batch
    for _ in range(max(0, s.warmup - 1)):
        step()
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(max(1, s.steps)):
        sync(dev)
        t0 = time.perf_counter()
        step()
        sync(dev)
        times.append(time.perf_counter() - t0)
        if s.row_seconds and len(times) >= 3 and time.perf_counter() - start > s.row_seconds:
            break
    info.pop("check")()  # a non-finite loss makes the timing meaningless: the row becomes an error
    rss = _rss_mib()  # this process's peak so far (a row subprocess reports it): before the ceiling's matmul
    cuda_peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else None
    del step
    free_memory(dev)
    # The ceiling again, in this process right after the timing: on a shared machine the load moves.
    ceiling = matmul_ceiling(s.device, s.ceiling_n, 3, s.precision)["gflops"]
    ips = sorted(batch / t for t in times)
    q = statistics.quantiles(ips, n=4) if len(ips) > 1 else [ips[0]] * 3
    out = {
        "row": row,
        "batch": batch,
        "steps_timed": len(times),
        "images_per_s": statistics.median(ips),
        "images_per_s_q1": q[0],
        "images_per_s_q3": q[2],
        "images_per_s_mean": statistics.fmean(ips),
        "images_per_s_std": statistics.stdev(ips) if len(ips) > 1 else 0.0,
        "images_per_s_max": ips[-1],  # the least disturbed step, on a shared machine
        "ms_per_step": statistics.median(times) * 1e3,
        "flops_per_image": flops,
        "row_ceiling_gflops": ceiling,
        **info,
        "load_1min": os.getloadavg()[0],
        "peak_mem_mib": cuda_peak,
        "process_peak_rss_mib": rss,
    }
    if cuda_peak is not None:
        out["peak_mem_kind"] = "cuda max_memory_allocated"
    return out


def _rss_mib() -> float:
    """Peak RSS of this process so far, MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 2**10


def run_row_isolated(s: BenchSetup, row: str, batch: int | None = None) -> dict[str, Any]:
    """:func:`run_row` in a fresh Python process, adding its peak RSS (``peak_mem_mib``) and the RSS it had
    after importing torch and mimkd, before building anything (``base_rss_mib``). Errors come back as
    ``{"row": ..., "error": ...}``."""
    payload = json.dumps({"setup": asdict(s), "row": row, "batch": batch})
    src = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-c", "from mimkd.bench.timing import _child_main; _child_main()"]
    p = subprocess.run(cmd, input=payload, capture_output=True, text=True, env=env)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(_CHILD_MARK):
            return json.loads(line[len(_CHILD_MARK) :])
    tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
    return {"row": row, "error": f"row subprocess exited with status {p.returncode}: {tail}"}


def _child_main() -> None:
    """Entry point of a row subprocess: JSON request on stdin, one marked JSON line on stdout."""
    import mimkd.distillers  # noqa: F401  (imports counted in the base RSS, as in any run)
    import mimkd.models  # noqa: F401

    req = json.loads(sys.stdin.read())
    s = BenchSetup(**{**req["setup"], "input_shape": tuple(req["setup"]["input_shape"])})
    base = _rss_mib()
    try:
        out = run_row(s, req["row"], req["batch"])
        if out["peak_mem_mib"] is None:  # CPU: the process ran only this row
            out.update(peak_mem_mib=out["process_peak_rss_mib"], base_rss_mib=base)
            out["peak_mem_kind"] = "cpu peak RSS"
    except Exception as e:  # reported in the table, the other rows go on
        out = {"row": req["row"], "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
    print(_CHILD_MARK + json.dumps(out), flush=True)


# -- ceiling, batch search, the whole table --------------------------------------------------------------
def matmul_ceiling(
    device: str = "cpu", n: int | None = None, reps: int = 5, precision: str = "fp32"
) -> dict[str, Any]:
    """Best GFLOP/s of an ``n × n`` matmul on ``device`` with the current thread setting (n: 2048 on CPU,
    8192 on CUDA), in float32 or, for ``precision="bf16"``, bfloat16 (on CUDA an fp32 result follows
    ``torch.backends.cuda.matmul.allow_tf32``)."""
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 2048)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(dev, dtype) for _ in range(2))
    a @ b
    best = math.inf
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        a @ b
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    name = str(dtype).removeprefix("torch.")
    out = {"n": n, "dtype": name, "gflops": 2 * n**3 / best / 1e9, "seconds": best}
    if dev.type == "cuda":
        out["allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
    return out


def _environment(dev: torch.device) -> dict[str, Any]:
    """torch version, device name, allocator and OpenMP wait settings, for the report's header."""
    import platform

    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    alloc = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "system"
    omp = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if k in os.environ}
    return {
        "torch": torch.__version__,
        "device_name": name,
        "allocator": alloc,
        "cpu_count": os.cpu_count(),
        "openmp": omp,
    }


def is_oom(e: BaseException) -> bool:
    """Whether ``e`` is a device out-of-memory error."""
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def find_max_batch(fits: Callable[[int], bool], start: int, limit: int) -> int | None:
    """The largest of ``start, 2·start, 4·start, ... <= limit`` for which ``fits`` holds, doubling until
    the first that does not; None when ``start`` itself does not fit."""
    best, b = None, start
    while b <= limit and fits(b):
        best, b = b, b * 2
    return best


def _fits(s: BenchSetup, row: str, batch: int) -> bool:
    """Whether two steps of ``row`` at ``batch`` run without running out of device memory."""
    dev = torch.device(s.device)
    step = None
    try:
        step, info = build_row(s, row, batch, dev)
        step()
        step()
        sync(dev)
        info["check"]()
        return True
    except Exception as e:
        if not is_oom(e):
            raise
        return False
    finally:
        del step
        free_memory(dev)


def _error(row: str, e: BaseException) -> dict[str, Any]:
    return {"row": row, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}


def benchmark(
    s: BenchSetup,
    methods: list[str],
    isolate: bool | None = None,
    max_batch: bool = False,
    max_batch_limit: int = 32768,
    rounds: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure the student step, the teacher forward and every method in ``methods``; returns the report
    (``header`` and ``rows``) that :mod:`mimkd.bench.report` formats.

    ``isolate`` (default: on CPU) runs each row in its own subprocess so its peak RSS is its own.
    ``max_batch`` (CUDA only) measures each row at the largest batch that fits (doubling from
    ``s.batch_size`` up to ``max_batch_limit`` and the training-set size). ``rounds`` > 1 measures all rows
    again, round-robin, and keeps each row's fastest round (the least disturbed on a shared machine); every
    round's median is kept in ``round_images_per_s``."""
    dev = torch.device(s.device)
    if max_batch and dev.type != "cuda":
        from mimkd.errors import ConfigError

        raise ConfigError("--max-batch searches for a CUDA out-of-memory error: use it with --device cuda")
    isolate = dev.type == "cpu" if isolate is None else isolate
    if s.threads:
        torch.set_num_threads(s.threads)
    say = progress or (lambda _m: None)
    header: dict[str, Any] = {
        **_environment(dev),
        "load_avg_start": list(os.getloadavg()),
        "threads": torch.get_num_threads(),
        "rounds": rounds,
    }
    say(f"matmul ceiling on {dev} ...")
    header["matmul_ceiling"] = matmul_ceiling(s.device, s.ceiling_n, precision=s.precision)
    names = [STUDENT_ROW, TEACHER_ROW, *[m for m in methods if m != "vanilla"]]
    done: dict[str, list[dict[str, Any]]] = {row: [] for row in names}
    batches: dict[str, int | None] = dict.fromkeys(names)
    for rnd in range(max(1, rounds)):
        for row in names:
            if done[row] and "error" in done[row][-1]:
                continue  # a row that failed once fails again
            if max_batch and rnd == 0:
                try:
                    limit = min(max_batch_limit, s.num_train)
                    batches[row] = find_max_batch(lambda b, r=row: _fits(s, r, b), s.batch_size, limit)
                except Exception as e:
                    done[row].append(_error(row, e))
                    continue
                if batches[row] is None:
                    done[row].append({"row": row, "error": f"batch {s.batch_size} does not fit in memory"})
                    continue
            t0 = time.perf_counter()
            if isolate:
                r = run_row_isolated(s, row, batches[row])
            else:
                try:
                    r = run_row(s, row, batches[row])
                except Exception as e:  # a method unfit for the pair: reported, the other rows go on
                    r = _error(row, e)
            r["seconds"] = time.perf_counter() - t0
            done[row].append(r)
            tag = f"[round {rnd + 1}/{rounds}] " if rounds > 1 else ""
            say(f"{tag}{row}: " + (r["error"] if "error" in r else f"{r['images_per_s']:.1f} img/s"))
    rows = []
    for row in names:
        ok = [r for r in done[row] if "error" not in r]
        if not ok:
            rows.append(done[row][-1])
            continue
        best = dict(max(ok, key=lambda r: r["images_per_s"]))
        best["round_images_per_s"] = [r["images_per_s"] for r in ok]
        rows.append(best)
    header["load_avg_end"] = list(os.getloadavg())
    return {"setup": asdict(s), "header": header, "rows": rows, "isolated": isolate, "max_batch": max_batch}
