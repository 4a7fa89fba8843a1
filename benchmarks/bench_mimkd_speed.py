"""Seconds per training step of vanilla, kd and mimkd, FLOPs per image, and MIMKD's FLOP-normalised overhead.

    python benchmarks/bench_mimkd_speed.py [--teacher resnet32x4 --student resnet8x4 --batch 64 --steps 8]

A step is what the trainer does: distiller forward (teacher under no_grad), the sum of the terms, backward,
SGD step. FLOPs per image are counted by torch's FlopCounterMode over one full training step (forward +
backward; the teacher forward only), divided by the batch. The figure of merit is

    overhead = (mimkd step time / kd step time) / (mimkd FLOPs / kd FLOPs)

(1.0: MIMKD's extra work runs exactly as efficiently as KD's; the target is <= 1.10). Inputs are random
(speed does not depend on pixel values); the memory bank has the CIFAR-100 size (50,000 x 128, K = 4096).
Writes a markdown table and JSON under results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import mimkd
from mimkd.models import build_model


def build(method: str, teacher: str, student: str, batch: int, classes: int, n_train: int, fmt, **opts):
    torch.manual_seed(0)
    s = build_model(student, num_classes=classes)
    needs_teacher = mimkd.distillers.get_method(method).requires_teacher
    t = build_model(teacher, num_classes=classes) if needs_teacher else None
    x = torch.randn(batch, 3, 32, 32)
    labels = torch.arange(n_train) % classes
    d = mimkd.build_distiller(
        method, s, t, x[:8], num_classes=classes, train_labels=labels, student_arch=student, **opts
    )
    if not d.offline_ready():  # KDEP's SVD: on a random batch (its cost is not part of a step)
        d.offline_pass([torch.randn(256, 3, 32, 32)], 1, None)
    d = d.to(memory_format=fmt).train()
    opt = torch.optim.SGD(
        [p for _, p in d.trainable_named_parameters()], lr=0.01, momentum=0.9, weight_decay=5e-4
    )
    return d, opt


def step(d, opt, x, y, idx) -> None:
    _, terms = d(x, y if d.uses_labels else None, idx)
    loss = sum(terms.values())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def measure(methods: list[str], args, fmt) -> list[dict]:
    """Time the methods' steps in interleaved rounds (so machine drift hits them alike); median per method."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, 100, (args.batch,), generator=g)
    idx = torch.randperm(50000, generator=g)[: args.batch]
    built, flops, times = {}, {}, {m: [] for m in methods}
    for m in methods:
        built[m] = build(m, args.teacher, args.student, args.batch, 100, 50000, fmt)
        with FlopCounterMode(display=False) as fc:
            step(*built[m], x, y, idx)
        flops[m] = fc.get_total_flops() / args.batch
        for _ in range(args.warmup):
            step(*built[m], x, y, idx)
    for _ in range(args.steps):
        for m in methods:
            t0 = time.perf_counter()
            step(*built[m], x, y, idx)
            times[m].append(time.perf_counter() - t0)
    return [
        {
            "method": m,
            "seconds_per_step": statistics.median(times[m]),
            "min_seconds": min(times[m]),
            "max_seconds": max(times[m]),
            "flops_per_image": flops[m],
        }
        for m in methods
    ]


def main() -> None:
    from mimkd.allocator import reexec_with_tcmalloc

    reexec_with_tcmalloc([__file__, *sys.argv[1:]])  # as the mimkd command does (see mimkd.allocator)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="resnet32x4")
    ap.add_argument("--student", default="resnet8x4")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last")
    ap.add_argument("--out", default="results/speed_mimkd")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fmt = torch.contiguous_format if args.contiguous else torch.channels_last
    rows = measure(["vanilla", "kd", "mimkd"], args, fmt)
    by = {r["method"]: r for r in rows}
    time_ratio = by["mimkd"]["seconds_per_step"] / by["kd"]["seconds_per_step"]
    flop_ratio = by["mimkd"]["flops_per_image"] / by["kd"]["flops_per_image"]
    overhead = time_ratio / flop_ratio
    env = (
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {'channels_last' if not args.contiguous else 'NCHW'}"
    )
    alloc = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc"
    lines = [
        f"# MIMKD step speed: {args.teacher} -> {args.student}, batch {args.batch}, CPU",
        "",
        f"Measured by `benchmarks/bench_mimkd_speed.py` ({env}, allocator {alloc}); median of {args.steps} "
        f"steps per method, the methods' steps interleaved, after {args.warmup} warm-up steps. FLOPs: torch "
        "FlopCounterMode over one training step (forward + backward; teacher forward only), per image. "
        "mimkd: default options (critics 512-512-1, infoNCE over 4096 bank negatives, N = 50,000).",
        "",
        "| method | s / step (median) | min - max | GFLOPs / image (step) | time vs kd | FLOPs vs kd |",
        "|---|---|---|---|---|---|",
    ]
    kd = by["kd"]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seconds_per_step']:.3f} | {r['min_seconds']:.2f} - "
            f"{r['max_seconds']:.2f} | {r['flops_per_image'] / 1e9:.2f} | "
            f"{r['seconds_per_step'] / kd['seconds_per_step']:.2f}x | "
            f"{r['flops_per_image'] / kd['flops_per_image']:.2f}x |"
        )
    lines += [
        "",
        f"**overhead = (mimkd step / kd step) / (mimkd FLOPs / kd FLOPs) = {time_ratio:.3f} / "
        f"{flop_ratio:.3f} = {overhead:.3f}** (target <= 1.10)",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(
        json.dumps({"rows": rows, "overhead": overhead, "env": env, "args": vars(args)}, indent=2) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
