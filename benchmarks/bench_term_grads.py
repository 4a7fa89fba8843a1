"""What ``train.log_term_grads`` costs: a logged training step against a plain one, interleaved.

    python benchmarks/bench_term_grads.py [--methods kd,mimkd] [--rounds 60] [--threads 1]

On the demo pair (``cnn_teacher`` -> ``conv4mp_w32``, Fashion-MNIST, batch 64, MIMKD with 32-wide critics
and K = 492 as in ``experiments/fair_fmnist.py``) each round times one plain step and one logged step (the
same real batch, alternating which comes first), so load on the machine hits both alike; the median ratio
is the cost of a logged step, and ``1 + (ratio - 1) / N`` the slowdown of a run that logs every N steps.
Writes ``results/bench_term_grads.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def _setup(method: str, threads: int):
    from mimkd.config import build_config
    from mimkd.demo import DEMO, _train_teacher
    from mimkd.engine.recipe import build_optimizer, param_groups
    from mimkd.engine.setup import prepare
    from mimkd.engine.step import TrainStep
    from mimkd.engine.term_grads import TermGradients

    cache = Path(os.environ.get("MIMKD_CACHE") or Path.home() / ".cache" / "mimkd")
    teacher, _ = _train_teacher(cache, None, DEMO["teacher"]["epochs"], 1.0)  # the demo's (cached)
    options = {"critic_width": 32, "num_negatives": 492} if method.startswith("mimkd") else {}
    cfg = build_config(
        {
            "threads": threads,
            "data": {"name": "fashion_mnist", "train_fraction": 0.1},
            "student": {"arch": DEMO["student"]},
            "teacher": {"arch": DEMO["teacher"]["arch"], "checkpoint": str(teacher)},
            "method": {"name": method, **options},
            "optim": {"recipe": "fashion_mnist", "batch_size": 64},
            "train": {"progress": False},
        }
    )
    p = prepare(cfg)
    d = p.distiller.train()
    opt = build_optimizer(p.cfg.optim, param_groups(d.trainable_named_parameters(), d.lr_scales()))
    return d, TrainStep(d, opt), TermGradients(d.student), p.train


def _batch(train, i: int):
    idx = torch.arange(i * 64, (i + 1) * 64) % len(train)
    images = (train.images[idx].float() / 255.0 - train.mean[0]) / train.std[0]
    return images.contiguous(memory_format=torch.channels_last), train.labels[idx], idx


def measure(method: str, rounds: int, threads: int) -> dict:
    d, step, probe, train = _setup(method, threads)
    for i in range(5):  # warm-up
        step(*_batch(train, i))
    plain, logged = [], []
    for r in range(rounds):
        batch = _batch(train, r)
        order = (False, True) if r % 2 == 0 else (True, False)
        for with_probe in order:
            t0 = time.perf_counter()
            out = step(*batch, inspect=probe if with_probe else None)
            (logged if with_probe else plain).append(time.perf_counter() - t0)
            assert bool(out.grads) == with_probe
    ratio = statistics.median(b / a for a, b in zip(plain, logged))
    return {
        "method": method,
        "terms": len(step._names),
        "plain_ms": 1000 * statistics.median(plain),
        "logged_ms": 1000 * statistics.median(logged),
        "ratio": ratio,
        "slowdown_every_20": 1 + (ratio - 1) / 20,
        "slowdown_every_100": 1 + (ratio - 1) / 100,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="kd,crd,mimkd")
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/bench_term_grads")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load = os.getloadavg()
    rows = [measure(m, a.rounds, a.threads) for m in a.methods.split(",")]
    lines = [
        f"`train.log_term_grads` cost on the demo pair, batch 64, {a.threads} thread(s), {a.rounds} "
        f"interleaved rounds (median); load average at start {load[0]:.2f} on {os.cpu_count()} cores",
        "",
        "| method | terms | plain step (ms) | logged step (ms) | logged / plain | slowdown N=20 | N=100 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['terms']} | {r['plain_ms']:.1f} | {r['logged_ms']:.1f} | "
            f"{r['ratio']:.2f}× | {r['slowdown_every_20']:.3f}× | {r['slowdown_every_100']:.3f}× |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    payload = {"rows": rows, "load_average": load, "threads": a.threads, "rounds": a.rounds}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
