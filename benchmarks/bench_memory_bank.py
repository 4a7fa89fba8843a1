"""Memory-bank scoring and class-aware negative sampling: strategy timings.

Writes ``results/bench_memory_bank.md`` (the "## Discussion" section of an existing file is kept).

Usage::

    PYTHONPATH=src python benchmarks/bench_memory_bank.py [--threads 1 [2]] [--repeats 7] [--quick]
        [--out results/bench_memory_bank.md]

Part 1 — ``MemoryBank.scores`` for B = 64, D = 128: the reference implementation (CRD: ``index_select`` of
B×(K+1)×D rows + ``bmm``), our ``'rows'`` path (the same algorithm), and ``'full'`` (``z @ Mᵀ`` then
``gather``), forward and forward+backward (gradient to ``z``), plus a sweep of ``B·(K+1)/N`` that locates the
crossover used by ``FULL_MATRIX_RATIO``.

Part 2 — K negatives of other classes per anchor, B = 64, N = 50 000 (100 classes), K ∈ {4096, 16384}: CRD's
per-sample ``np.random.choice`` loop (reference), ``torch.multinomial`` without replacement, argsort of random
keys, top-k of float32 keys, and the two exact methods of ``ClassAwareNegativeSampler`` (``'topk'``: top-k of
62-bit keys over the class-sorted pool; ``'draw'``: i.i.d. draws with repeats dropped).

Timings: each case is warmed up once, then run ``--repeats`` times; the table reports the minimum and the
median in milliseconds (the minimum is the least disturbed by other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mimkd.mi.memory import FULL_MATRIX_RATIO, TOPK_DRAW_RATIO, ClassAwareNegativeSampler, MemoryBank

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


# ------------------------------------------------------------------------------------------ bank scoring
def reference_scores(memory: torch.Tensor, z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """CRD's ContrastMemory: gather B×(K+1)×D rows, then a batched matrix-vector product."""
    weight = (
        torch.index_select(memory, 0, idx.view(-1)).detach().view(idx.shape[0], idx.shape[1], memory.shape[1])
    )
    return torch.bmm(weight, z.view(z.shape[0], -1, 1)).squeeze(2)


def bench_scores(n: int, k: int, repeats: int) -> dict[str, tuple[float, float]]:
    g = torch.Generator().manual_seed(0)
    bank = MemoryBank(n, D, generator=g)
    z = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1).requires_grad_(True)
    idx = torch.randint(0, n, (B, k + 1), generator=g)
    weights = torch.randn(B, k + 1, generator=g)
    fns = {
        "reference": lambda: reference_scores(bank.memory, z, idx),
        "rows": lambda: bank.scores(z, idx, strategy="rows"),
        "full": lambda: bank.scores(z, idx, strategy="full"),
    }
    ref = fns["reference"]().detach()
    out: dict[str, tuple[float, float]] = {}
    for name, fn in fns.items():
        assert torch.allclose(fn().detach(), ref, atol=1e-5), name
        with torch.no_grad():
            out[f"{name} fwd"] = timeit(fn, repeats)

        def step(fn=fn) -> None:
            z.grad = None
            (fn() * weights).sum().backward()

        out[f"{name} fwd+bwd"] = timeit(step, repeats)
    return out


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="fewer cases (smoke test)")
    parser.add_argument("--out", default="results/bench_memory_bank.md")
    args = parser.parse_args()

    cpu = platform.processor() or platform.machine()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        "# Memory bank: scoring strategies and negative sampling",
        "",
        f"Generated by `benchmarks/bench_memory_bank.py`. torch {torch.__version__}, {cpu}, "
        f"{os.cpu_count()} logical CPUs, B = {B}, D = {D}. Times in ms as **min / median** of "
        f"{args.repeats} runs after one warm-up. Load average at start: {load} (the machine is shared with "
        "other jobs; the minimum is the less disturbed figure).",
        "",
        f"Library settings chosen from these numbers: `FULL_MATRIX_RATIO = {FULL_MATRIX_RATIO}` (`scores` "
        f"uses the full matrix when B·(K+1) ≥ ratio·N), `TOPK_DRAW_RATIO = {TOPK_DRAW_RATIO}` (the sampler "
        "uses top-k of random keys when the expected draws exceed ratio·pool, else draw-and-drop-repeats).",
        "",
    ]
    main_cases = [(50_000, 4096), (50_000, 16384), (6000, 4096)]
    sweep = [(50_000, k) for k in (64, 256, 512, 768, 1024, 1536)] + [
        (6000, k) for k in (16, 48, 96, 128, 192)
    ]
    if args.quick:
        main_cases, sweep = main_cases[:1], sweep[:2]
    for threads in args.threads:
        torch.set_num_threads(threads)
        lines += [f"## {threads} thread{'s' if threads > 1 else ''}", "", "### `MemoryBank.scores`", ""]
        lines += [
            "| N | K | B·(K+1)/N | reference fwd | rows fwd | full fwd | reference fwd+bwd | rows fwd+bwd "
            "| full fwd+bwd | full speed-up (fwd+bwd) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for n, k in main_cases + sweep:
            r = bench_scores(n, k, args.repeats)
            speedup = r["reference fwd+bwd"][0] / r["full fwd+bwd"][0]
            lines.append(
                f"| {n} | {k} | {B * (k + 1) / n:.2f} | {fmt(r['reference fwd'])} | {fmt(r['rows fwd'])} | "
                f"{fmt(r['full fwd'])} | {fmt(r['reference fwd+bwd'])} | {fmt(r['rows fwd+bwd'])} | "
                f"{fmt(r['full fwd+bwd'])} | {speedup:.1f}× |"
            )
            print(lines[-1], flush=True)
        lines += ["", "### Class-aware negative sampling (N = 50 000, 100 classes)", ""]
        lines += ["| method | K = 4096 | K = 16384 |", "|---|---|---|"]
        results = {
            k: bench_sampling(k, args.repeats, with_loop=threads == args.threads[0]) for k in (4096, 16384)
        }
        chosen = {k: ClassAwareNegativeSampler(torch.arange(50_000) % 100, k).method for k in (4096, 16384)}
        for name in results[16384]:
            cells = [
                fmt(results[k][name]) + (f" (→ {chosen[k]})" if "auto" in name else "") for k in (4096, 16384)
            ]
            lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
            print(lines[-1], flush=True)
        if not args.quick:
            lines += ["", "Crossover of the two exact sampler methods:", ""]
            lines += ["| K | expected draws / pool | 'draw' | 'topk' |", "|---|---|---|---|"]
            for k, ratio, draw, topk in sampler_crossover(args.repeats):
                lines.append(f"| {k} | {ratio:.3f} | {fmt(draw)} | {fmt(topk)} |")
                print(lines[-1], flush=True)
        lines.append("")
    lines.append("Load average at end: " + " ".join(f"{x:.1f}" for x in os.getloadavg()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    existing = out.read_text() if out.exists() else ""
    marker = "\n## Discussion"
    discussion = existing[existing.index(marker) :] if marker in existing else ""
    out.write_text("\n".join(lines) + "\n" + discussion)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
