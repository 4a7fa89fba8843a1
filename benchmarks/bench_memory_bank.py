"""Memory banks from CIFAR-100 to ImageNet size: scoring paths, the cost model, negative sampling.

Writes ``results/bench_memory_bank.md`` and ``.json`` (an existing file's "## Discussion" section is kept).

Usage::

    PYTHONPATH=src python benchmarks/bench_memory_bank.py [--threads 2] [--repeats 3] [--quick]
        [--out results/bench_memory_bank.md]

Part 1 — the grid N ∈ {50k, 200k, 1.28M} × B ∈ {64, 256} × K ∈ {4096, 16384}, D = 128: one bank step
(:func:`mimkd.bench.bank.measure_bank_step`: sample K negatives per anchor, score, update the batch's rows in
place, backward) forced to each scoring path, each in a fresh process (time of each part, peak memory above
the bank itself); the path the cost model (:mod:`mimkd.mi.bank_scores`) chooses, and its time against the
faster one. The constants the forward times imply are printed beside the library's.

Part 2 — the sampler at N = 1.28M against the previous algorithm (a B×N table of first occurrences).

Part 3 — K negatives of other classes per anchor, B = 64, N = 50 000 (100 classes), K ∈ {4096, 16384}: CRD's
per-sample ``np.random.choice`` loop (reference), ``torch.multinomial`` without replacement, argsort of random
keys, top-k of float32 keys, and the two exact methods of ``ClassAwareNegativeSampler``.

Timings of parts 2–3: each case is warmed up once, then run ``--repeats`` times; the table reports the minimum
and the median in milliseconds (the minimum is the least disturbed by other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mimkd.bench.bank import measure_isolated
from mimkd.mi.bank_scores import COSTS, choose_strategy
from mimkd.mi.memory import TOPK_DRAW_RATIO, ClassAwareNegativeSampler

B, D = 64, 128


def timeit(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3, statistics.median(times) * 1e3


def fmt(t: tuple[float, float]) -> str:
    return f"{t[0]:.1f} / {t[1]:.1f}"


# ------------------------------------------------------------------------------------------ the grid
GRID_N = (50_000, 200_000, 1_281_167)
GRID_B = (64, 256)
GRID_K = (4096, 16384)


def bench_grid(threads: int, repeats: int, quick: bool) -> list[dict]:
    points = [(n, b, k) for n in GRID_N for b in GRID_B for k in GRID_K]
    if quick:
        points = [(50_000, 64, 4096), (1_281_167, 64, 4096)]
    out = []
    for n, b, k in points:
        runs = {
            s: measure_isolated(threads, n=n, batch=b, k=k, dim=D, strategy=s, repeats=repeats)
            for s in ("full", "rows")
        }
        chosen = choose_strategy(n, b, k, D)
        best = min(runs, key=lambda s: runs[s].get("seconds", float("inf")))
        row = {"n": n, "batch": b, "k": k, "chosen": chosen, "best": best, **runs}
        row["chosen_vs_best"] = runs[chosen]["seconds"] / runs[best]["seconds"]
        out.append(row)
        print(_grid_line(row), flush=True)
    return out


def _grid_line(r: dict) -> str:
    full, rows = r["full"], r["rows"]
    return (
        f"| {r['n']:,} | {r['batch']} | {r['k']} | {full['parts']['scores'] * 1e3:.0f} | "
        f"{rows['parts']['scores'] * 1e3:.0f} | {full['parts']['backward'] * 1e3:.0f} | "
        f"{full['parts']['sample'] * 1e3:.0f} | {full['parts']['update'] * 1e3:.1f} | "
        f"{full['seconds'] * 1e3:.0f} | {rows['seconds'] * 1e3:.0f} | {full['peak_mib']:.0f} | "
        f"{rows['peak_mib']:.0f} | {r['chosen']} | {r['best']} | {r['chosen_vs_best']:.2f} |"
    )


def fitted_constants(grid: list[dict]) -> tuple[float, float]:
    """Median seconds per B×N score (full forward) and per gathered float (rows forward) over the grid."""
    full = [r["full"]["parts"]["scores"] / (r["batch"] * r["n"]) for r in grid]
    rows = [r["rows"]["parts"]["scores"] / (r["batch"] * (r["k"] + 1) * D) for r in grid]
    return statistics.median(full), statistics.median(rows)


def previous_sampler(labels: torch.Tensor, k: int, index: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The sampler's previous duplicate test (pool positions only): a B×N table of first occurrences."""
    n, batch = labels.numel(), index.numel()
    pool = n - n // 1000
    draws = ClassAwareNegativeSampler(labels, k)._draws
    stream = torch.randint(0, pool, (batch, draws), generator=g)
    step = torch.arange(draws, dtype=torch.int32).expand(batch, draws)
    first = torch.full((batch, pool), draws, dtype=torch.int32)
    first.scatter_reduce_(1, stream, step, reduce="amin")
    return first.gather(1, stream) == step


def bench_sampler_scale(repeats: int) -> list[tuple[int, int, tuple, tuple]]:
    n = 1_281_167
    labels = torch.arange(n) % 1000
    g = torch.Generator().manual_seed(0)
    rows = []
    for b in GRID_B:
        index = torch.randint(0, n, (b,), generator=g)
        k = 16384
        sampler = ClassAwareNegativeSampler(labels, k)
        rows.append(
            (
                b,
                k,
                timeit(lambda s=sampler, i=index: s.sample(i, g), repeats),
                timeit(lambda i=index, k=k: previous_sampler(labels, k, i, g), repeats),
            )
        )
    return rows


# --------------------------------------------------------------------------------------------- sampling
def sample_numpy_loop(
    labels_np: np.ndarray, pools: list[np.ndarray], index: np.ndarray, k: int
) -> np.ndarray:
    """CRD's dataset: one np.random.choice(pool, K, replace=False) per sample (here over the batch)."""
    rows = [np.hstack([[i], np.random.choice(pools[labels_np[i]], k, replace=False)]) for i in index]
    return np.stack(rows)


def sample_multinomial(labels: torch.Tensor, index: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    weights = (labels.unsqueeze(0) != labels[index].unsqueeze(1)).float()
    return torch.multinomial(weights, k, replacement=False, generator=g)


def sample_argsort(labels: torch.Tensor, index: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    keys = torch.rand(index.numel(), labels.numel(), generator=g)
    keys.masked_fill_(labels.unsqueeze(0) == labels[index].unsqueeze(1), 2.0)
    return keys.argsort(dim=1)[:, :k]


def sample_topk_f32(labels: torch.Tensor, index: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    keys = torch.rand(index.numel(), labels.numel(), generator=g)
    keys.masked_fill_(labels.unsqueeze(0) == labels[index].unsqueeze(1), 2.0)
    return keys.topk(k, dim=1, largest=False, sorted=False).indices


def bench_sampling(k: int, repeats: int, with_loop: bool) -> dict[str, tuple[float, float]]:
    n, classes = 50_000, 100
    g = torch.Generator().manual_seed(0)
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    index = torch.randint(0, n, (B,), generator=g)
    out: dict[str, tuple[float, float]] = {}
    if with_loop:
        labels_np = labels.numpy()
        pools = [np.flatnonzero(labels_np != c) for c in range(classes)]
        out["CRD per-sample np.random.choice loop"] = timeit(
            lambda: sample_numpy_loop(labels_np, pools, index.numpy(), k), max(1, repeats // 3)
        )
    out["torch.multinomial (no replacement)"] = timeit(
        lambda: sample_multinomial(labels, index, k, g), repeats
    )
    out["argsort of float32 keys"] = timeit(lambda: sample_argsort(labels, index, k, g), repeats)
    out["top-k of float32 keys (masked)"] = timeit(lambda: sample_topk_f32(labels, index, k, g), repeats)
    for method in ("topk", "draw"):
        sampler = ClassAwareNegativeSampler(labels, k, method=method)
        out[f"ClassAwareNegativeSampler method='{method}'"] = timeit(
            lambda s=sampler: s.sample(index, g), repeats
        )
    auto = ClassAwareNegativeSampler(labels, k)
    out["ClassAwareNegativeSampler 'auto' (default)"] = timeit(lambda: auto.sample(index, g), repeats)
    return out


def sampler_crossover(repeats: int) -> list[tuple[int, float, tuple[float, float], tuple[float, float]]]:
    n, classes = 50_000, 100
    g = torch.Generator().manual_seed(1)
    labels = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    index = torch.randint(0, n, (B,), generator=g)
    rows = []
    for k in (2048, 4096, 8192, 16384, 24576, 32768, 40960, 45056):
        draw = ClassAwareNegativeSampler(labels, k, method="draw")
        topk = ClassAwareNegativeSampler(labels, k, method="topk")
        rows.append(
            (
                k,
                draw._draws / draw.max_pool,
                timeit(lambda s=draw: s.sample(index, g), repeats),
                timeit(lambda s=topk: s.sample(index, g), repeats),
            )
        )
    return rows


def _grid_section(grid: list[dict], threads: int) -> list[str]:
    fit_full, fit_rows = fitted_constants(grid)
    lib = COSTS["cpu"]
    worst = max(r["chosen_vs_best"] for r in grid)
    lines = [
        f"## 1. One bank step, N up to 1.28M ({threads} thread{'s' if threads > 1 else ''})",
        "",
        "Milliseconds per step (median of the timed steps, each (N, B, K, path) in a fresh process); peak "
        "memory = the process's peak resident set above what it held with bank and sampler built. The "
        "backward (a weighted sum of each anchor's K+1 rows) and the sampler are the same for both paths "
        "(shown once, from the full-path process). `chosen`: the cost model's path; `chosen / best`: its "
        "whole step against the faster path's.",
        "",
        "| N | B | K | full fwd | rows fwd | backward | sample | update | full step | rows step "
        "| full peak MiB | rows peak MiB | chosen | best | chosen / best |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(_grid_line(r) for r in grid),
        "",
        f"Worst chosen / best over the grid: **{worst:.2f}**. Constants these forward times imply: "
        f"{fit_full:.2e} s per B×N score (library: {lib.full_per_score:.2e}), {fit_rows:.2e} s per gathered "
        f"float (library: {lib.rows_per_value:.2e}); the model picks `full` when N < "
        f"{lib.rows_per_value * 128 / lib.full_per_score:.1f}·(K+1).",
        "",
    ]
    return lines


def _sampler_sections(repeats: int, quick: bool) -> list[str]:
    lines = ["## 2. Sampler at N = 1,281,167 (1000 classes), K = 16384", ""]
    lines += [
        "| B | K | ClassAwareNegativeSampler.sample (whole call) "
        "| previous duplicate test alone (B×N table) |",
        "|---|---|---|---|",
    ]
    for b, k, new, old in bench_sampler_scale(max(1, repeats)):
        lines.append(f"| {b} | {k} | {fmt(new)} | {fmt(old)} |")
        print(lines[-1], flush=True)
    lines += ["", "## 3. Class-aware negative sampling (B = 64, N = 50 000, 100 classes)", ""]
    lines += ["| method | K = 4096 | K = 16384 |", "|---|---|---|"]
    results = {k: bench_sampling(k, repeats, with_loop=True) for k in (4096, 16384)}
    chosen = {k: ClassAwareNegativeSampler(torch.arange(50_000) % 100, k).method for k in (4096, 16384)}
    for name in results[16384]:
        cells = [
            fmt(results[k][name]) + (f" (→ {chosen[k]})" if "auto" in name else "") for k in (4096, 16384)
        ]
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
        print(lines[-1], flush=True)
    if not quick:
        lines += ["", "Crossover of the two exact sampler methods:", ""]
        lines += ["| K | expected draws / pool | 'draw' | 'topk' |", "|---|---|---|---|"]
        for k, ratio, draw, topk in sampler_crossover(repeats):
            lines.append(f"| {k} | {ratio:.3f} | {fmt(draw)} | {fmt(topk)} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer cases (smoke test)")
    parser.add_argument("--out", default="results/bench_memory_bank.md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = platform.processor() or platform.machine()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "# Memory bank: scoring paths, cost model and negative sampling, up to ImageNet size",
        "",
        f"Generated by `benchmarks/bench_memory_bank.py`. torch {torch.__version__}, {cpu}, "
        f"{os.cpu_count()} logical CPUs, {args.threads} torch threads, D = {D}. Load average at start: "
        f"{load} (the machine is shared with other jobs).",
        "",
        f"Library settings: the cost model's constants `COSTS['cpu']` (mimkd.mi.bank_scores) and "
        f"`TOPK_DRAW_RATIO = {TOPK_DRAW_RATIO}` (the sampler uses top-k of random keys when the expected "
        "draws exceed ratio·pool, else draw-and-drop-repeats).",
        "",
    ]
    grid = bench_grid(args.threads, args.repeats, args.quick)
    lines += _grid_section(grid, args.threads)
    lines += _sampler_sections(args.repeats, args.quick)
    lines += ["", "Load average at end: " + " ".join(f"{x:.1f}" for x in os.getloadavg())]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = out.read_text() if out.exists() else ""
    marker = "\n## Discussion"
    discussion = existing[existing.index(marker) :] if marker in existing else ""
    out.write_text("\n".join(lines) + "\n" + discussion)
    out.with_suffix(".json").write_text(json.dumps({"load_start": load, "grid": grid}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
