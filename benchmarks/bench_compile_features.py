"""``train.compile`` on feature methods: compile time and step time against eager, interleaved.

    python benchmarks/bench_compile_features.py [--methods kd,at,mimkd] [--rounds 40] [--threads 2]

Since feature capture is scoped (``FeatureTap.capture``), a feature method's student and teacher compile
like kd's. On the demo pair (``cnn_teacher`` -> ``conv4mp_w32``, Fashion-MNIST, batch 64; MIMKD with 32-wide
critics and K = 492 as in ``experiments/fair_fmnist.py``) this builds each method twice from one seed, one
copy compiled with :func:`~mimkd.engine.step.compile_distiller` (inductor), and reports

* the compile cost: the wall time of the compiled copy's first training step (graph capture and code
  generation) minus an eager step;
* the step time: per round one eager and one compiled step on the same real batch, alternating which runs
  first, so load on the machine hits both alike; the median ratio compiled / eager;
* the largest difference of the loss terms of the first step, where both copies hold the same weights
  (relative and absolute: a term near zero, such as an MI bound at the start, has a large relative one).

Writes ``results/bench_compile_features.md`` / ``.json`` with the machine's load average.
"""

from __future__ import annotations

import argparse
import copy
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
    from mimkd.engine.setup import prepare

    cache = Path(os.environ.get("MIMKD_CACHE") or Path.home() / ".cache" / "mimkd")
    teacher, _ = _train_teacher(cache, None, DEMO["teacher"]["epochs"], 1.0)  # the demo's (cached)
    options = {"critic_width": 32, "num_negatives": 492} if method.startswith("mimkd") else {}
    cfg = build_config(
        {
            "threads": threads,
            "seed": 0,
            "data": {"name": "fashion_mnist", "train_fraction": 0.1},
            "student": {"arch": DEMO["student"]},
            "teacher": {"arch": DEMO["teacher"]["arch"], "checkpoint": str(teacher)},
            "method": {"name": method, **options},
            "optim": {"recipe": "fashion_mnist", "batch_size": 64},
            "train": {"progress": False},
        }
    )
    p = prepare(cfg)
    return p.distiller.train(), p.cfg, p.train


def _step(d, cfg):
    from mimkd.engine.recipe import build_optimizer, param_groups
    from mimkd.engine.step import TrainStep

    opt = build_optimizer(cfg.optim, param_groups(d.trainable_named_parameters(), d.lr_scales()))
    return TrainStep(d, opt)


def _batch(train, i: int):
    idx = torch.arange(i * 64, (i + 1) * 64) % len(train)
    images = (train.images[idx].float() / 255.0 - train.mean[0]) / train.std[0]
    return images.contiguous(), train.labels[idx], idx


def _timed(step, batch) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = step(*batch)
    return time.perf_counter() - t0, out.terms


def measure(method: str, rounds: int, threads: int) -> dict:
    from mimkd.engine.step import compile_distiller

    torch._dynamo.reset()
    eager, cfg, train = _setup(method, threads)
    compiled = compile_distiller(copy.deepcopy(eager))
    e_step, c_step = _step(eager, cfg), _step(compiled, cfg)
    first_eager, e_terms = _timed(e_step, _batch(train, 0))
    first_compiled, c_terms = _timed(c_step, _batch(train, 0))
    # the first step starts both copies from the same weights: its terms compare the two computations (later
    # steps drift apart, as any two float orders of summation do over training)
    worst = max(float((c_terms[k] - v).abs() / v.abs().clamp_min(1e-12)) for k, v in e_terms.items())
    worst_abs = max(float((c_terms[k] - v).abs()) for k, v in e_terms.items())
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for r in range(1, rounds + 1):
        b = _batch(train, r)
        order = [("eager", e_step), ("compiled", c_step)]
        for name, step in order if r % 2 else order[::-1]:
            times[name].append(_timed(step, b)[0])
    ratios = [c / e for c, e in zip(times["compiled"], times["eager"])]
    return {
        "method": method,
        "eager_step_ms": 1000 * statistics.median(times["eager"]),
        "compiled_step_ms": 1000 * statistics.median(times["compiled"]),
        "ratio_median": statistics.median(ratios),
        "compile_seconds": first_compiled - first_eager,
        "max_rel_term_diff": worst,
        "max_abs_term_diff": worst_abs,
        "rounds": rounds,
        "student_compiled": compiled.student._compiled_call_impl is not None,
        "teacher_compiled": compiled.teacher._compiled_call_impl is not None,
    }


def _markdown(rows: list[dict], header: dict) -> str:
    lines = [
        "# `train.compile` on feature methods (CPU)",
        "",
        "Produced by `benchmarks/bench_compile_features.py` on the demo pair (cnn_teacher → conv4mp_w32,",
        "Fashion-MNIST, batch 64). Feature capture is scoped to one forward, so the tapped student and",
        "teacher of a feature method compile like kd's. Step times are medians of interleaved rounds; the",
        "compile cost is the compiled copy's first step minus an eager first step.",
        "",
        f"Machine: {header['cpus']} CPU cores, torch {header['torch']}, {header['threads']} thread(s); load "
        f"average {header['load_before']} before, {header['load_after']} after.",
        "",
        "| method | eager step (ms) | compiled step (ms) | compiled / eager | compile cost (s) | max term "
        "diff "
        "(rel / abs) | networks compiled |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        nets = "student+teacher" if r["student_compiled"] and r["teacher_compiled"] else "no"
        lines.append(
            f"| {r['method']} | {r['eager_step_ms']:.1f} | {r['compiled_step_ms']:.1f} | "
            f"{r['ratio_median']:.2f} | {r['compile_seconds']:.1f} | {r['max_rel_term_diff']:.1e} / "
            f"{r['max_abs_term_diff']:.1e} | {nets} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="kd,at,mimkd")
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="results/bench_compile_features")
    a = ap.parse_args(argv)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = []
    for m in a.methods.split(","):
        rows.append(measure(m, a.rounds, a.threads))
        print(json.dumps(rows[-1]), file=sys.stderr)
    header = {
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": a.threads,
        "load_before": load_before,
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(rows, header))
    print(_markdown(rows, header))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
