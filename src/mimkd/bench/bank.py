"""What a memory bank costs per training step at a given training-set size (``mimkd bench --bank-size``).

One *bank step* is what CRD, WCoRD and MIMKD's global term do per bank and step: draw the anchors'
class-aware negatives (:class:`~mimkd.mi.sampler.ClassAwareNegativeSampler`), score the embeddings against
the bank (:meth:`~mimkd.mi.memory.MemoryBank.scores`), write the batch's rows
(:meth:`~mimkd.mi.memory.MemoryBank.update`) and backpropagate to the embeddings. Each (N, B, K, strategy)
is measured in a fresh process, so that its peak memory is its own (docs/methods/crd.md, results in
``results/bench_memory_bank.md``).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

__all__ = ["BANKS", "bank_report", "measure_bank_step", "measure_isolated", "projection_rows"]

# bank geometry of the methods that keep one: (banks per step, negatives K, embedding dim)
BANKS: dict[str, tuple[int, int, int]] = {
    "crd": (2, 16384, 128),
    "wcord": (2, 16384, 128),
    "mimkd": (2, 4096, 128),
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux ``clear_refs`` 5); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_bank_step(
    n: int,
    batch: int,
    k: int,
    dim: int = 128,
    strategy: str = "auto",
    repeats: int = 3,
    classes: int = 1000,
    device: str = "cpu",
) -> dict[str, Any]:
    """Median seconds of a bank step's parts at bank size ``n`` (after one warm-up step), and memory.

    ``peak_mib``: on a CPU, the process's peak resident memory above what it held once bank and sampler were
    built; on CUDA, the peak allocated device memory above the same point.
    """
    from mimkd.mi.bank_scores import choose_strategy
    from mimkd.mi.memory import ClassAwareNegativeSampler, MemoryBank

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    labels = (torch.arange(n) % classes).to(dev)
    bank = MemoryBank(n, dim, generator=torch.Generator().manual_seed(0)).to(dev)
    sampler = ClassAwareNegativeSampler(labels, k)
    chosen = choose_strategy(n, batch, k, dim, dev.type) if strategy == "auto" else strategy
    base = torch.cuda.memory_allocated(dev) / 2**20 if cuda else _rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    _reset_peak()  # the bank's construction (a few N×D temporaries) is not the step's

    def now() -> float:
        if cuda:
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    parts: dict[str, list[float]] = {"sample": [], "scores": [], "update": [], "backward": []}
    for step in range(repeats + 1):
        anchors = torch.randint(0, n, (batch,), generator=g, device=dev)
        z = torch.randn(batch, dim, generator=g, device=dev)
        z = torch.nn.functional.normalize(z, dim=1).requires_grad_(True)
        t0 = now()
        idx = sampler.sample(anchors, g)
        t1 = now()
        out = bank.scores(z, idx, strategy=chosen)
        t2 = now()
        bank.update(anchors, z.detach())
        t3 = now()
        out.logsumexp(1).sum().backward()
        t4 = now()
        if step:  # the first step warms caches and the allocator
            for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[key].append(dt)
    seconds = {key: statistics.median(v) for key, v in parts.items()}
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else _peak_mib()
    return {
        "n": n,
        "batch": batch,
        "k": k,
        "dim": dim,
        "strategy": chosen,
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "seconds": sum(seconds.values()),
        "parts": seconds,
        "peak_mib": max(0.0, peak - base),
    }


def measure_isolated(threads: int | None = None, **kwargs: Any) -> dict[str, Any]:
    """:func:`measure_bank_step` in a fresh Python process (its peak memory is then this step's alone)."""
    code = (
        "import json, sys, torch\n"
        "from mimkd.bench.bank import measure_bank_step\n"
        f"torch.set_num_threads({threads or torch.get_num_threads()})\n"
        "print(json.dumps(measure_bank_step(**json.loads(sys.argv[1]))))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, check=False
    )
    if res.returncode:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        return {**kwargs, "error": tail}
    return json.loads(res.stdout.strip().splitlines()[-1])


def projection_rows(
    n: int, batch: int, methods: list[str], threads: int | None = None, repeats: int = 3, device: str = "cpu"
) -> list[dict[str, Any]]:
    """Per method with a bank: one measured bank step at ``n`` (the cost model's path and, for the
    comparison, the other one), and the bank's share of an epoch of ``n`` images (``banks`` per step)."""
    rows = []
    for method in methods:
        if method not in BANKS:
            continue
        banks, k, dim = BANKS[method]
        measured = {
            s: measure_isolated(
                threads, n=n, batch=batch, k=k, dim=dim, strategy=s, repeats=repeats, device=device
            )
            for s in ("full", "rows")
        }
        from mimkd.mi.bank_scores import choose_strategy

        chosen = choose_strategy(n, batch, k, dim, torch.device(device).type)
        steps = -(-n // batch)
        row = {"method": method, "n": n, "batch": batch, "k": k, "banks": banks, "chosen": chosen}
        for s, m in measured.items():
            row[s] = m
        if "error" not in measured[chosen]:
            m = measured[chosen]  # one negative draw per step serves every bank of the method
            per_step = m["parts"]["sample"] + banks * (m["seconds"] - m["parts"]["sample"])
            row["epoch_hours"] = per_step * steps / 3600
        rows.append(row)
    return rows


def bank_report(rows: list[dict[str, Any]]) -> str:
    """Markdown of :func:`projection_rows`: per method, both paths' step time and peak memory, the chosen
    path, and the banks' projected hours per epoch."""
    if not rows:
        return "no benchmarked method keeps a memory bank\n"
    n, batch = rows[0]["n"], rows[0]["batch"]
    threads = rows[0]["full"].get("threads", torch.get_num_threads())
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = [
        f"# Memory-bank cost at N = {n:,} training samples, batch {batch}",
        "",
        f"One bank step (sample K negatives, score, update, backward), measured in a fresh process per path "
        f"on {rows[0]['full'].get('device', 'cpu')} (torch {torch.__version__}, {threads} threads, "
        f"load {load}); "
        "peak = resident memory above the bank itself. Epoch = (one negative draw + banks × the rest of the "
        "step) × ⌈N / batch⌉.",
        "",
        "| method | K | banks | full step s | rows step s | full peak MiB | rows peak MiB | chosen "
        "| bank hours / epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = []
        for key in ("seconds", "peak_mib"):
            for s in ("full", "rows"):
                m = r[s]
                cells.append(
                    m["error"][:40]
                    if "error" in m
                    else f"{m[key]:.3f}"
                    if key == "seconds"
                    else f"{m[key]:.0f}"
                )
        hours = f"{r['epoch_hours']:.2f}" if "epoch_hours" in r else "N/A"
        lines.append(
            f"| {r['method']} | {r['k']} | {r['banks']} | {' | '.join(cells)} | {r['chosen']} | {hours} |"
        )
    return "\n".join(lines) + "\n"
