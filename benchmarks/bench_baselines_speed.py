"""Seconds per training step of every registered method side by side with kd, FLOPs per image, and each
method's FLOP-normalised cost.

    python benchmarks/bench_baselines_speed.py [--teacher resnet32x4 --student resnet8x4 --batch 64 --steps 8]
                                               [--methods kd,vid,crd] [--with-mimkd]

A step is what the trainer does in the main stage: distiller forward (teacher under no_grad), the sum of the
terms, backward, SGD step (methods with an initialisation stage are timed in their main stage). The methods'
steps are interleaved round by round (so drift of a shared machine hits them alike); the median is
reported. FLOPs per image are counted by torch's FlopCounterMode over one full training step (forward +
backward; the teacher forward only), divided by the batch. For each method

    cost = (method step time / kd step time) / (method FLOPs / kd FLOPs)

(1.0: the method's extra work runs exactly as efficiently as KD's). Inputs are random (speed does not depend
on pixel values); memory banks have the CIFAR-100 size (N = 50,000, 100 classes), every method runs with its
default options (CRD: K = 16384). ``mimkd`` is left out unless ``--with-mimkd`` (it has its own benchmark,
bench_mimkd_speed.py). A method that cannot be built or stepped for the pair is listed with its error.
Writes a markdown table and JSON (default ``results/speed_baselines.{md,json}``).
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
import mimkd.distillers

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_mimkd_speed as mimkd_speed  # noqa: E402  (the same build and step as the MIMKD benchmark)

CLASSES = 100
N_TRAIN = 50000


def build(method: str, teacher: str, student: str, fmt):
    """The distiller and its SGD, built as ``bench_mimkd_speed`` builds them (CIFAR-100 sized bank)."""
    return mimkd_speed.build(method, teacher, student, 8, CLASSES, N_TRAIN, fmt)


step = mimkd_speed.step


def measure(methods: list[str], args, fmt) -> tuple[list[dict], dict[str, str]]:
    """Time the methods' steps in interleaved rounds; median per method. Returns rows and build errors."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, 32, 32, generator=g).contiguous(memory_format=fmt)
    y = torch.randint(0, CLASSES, (args.batch,), generator=g)
    idx = torch.randperm(N_TRAIN, generator=g)[: args.batch]
    built, flops, errors = {}, {}, {}
    for m in methods:
        try:
            built[m] = build(m, args.teacher, args.student, fmt)
            with FlopCounterMode(display=False) as fc:
                step(*built[m], x, y, idx)
            flops[m] = fc.get_total_flops() / args.batch
            for _ in range(args.warmup):
                step(*built[m], x, y, idx)
        except Exception as e:  # a method under construction or unfit for the pair: report, keep going
            if m == "kd":
                raise
            built.pop(m, None)
            errors[m] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            print(f"[skip] {m}: {errors[m]}", file=sys.stderr)
    times: dict[str, list[float]] = {m: [] for m in built}
    for _ in range(args.steps):
        for m in built:
            t0 = time.perf_counter()
            step(*built[m], x, y, idx)
            times[m].append(time.perf_counter() - t0)
    rows = [
        {
            "method": m,
            "seconds_per_step": statistics.median(times[m]),
            "min_seconds": min(times[m]),
            "max_seconds": max(times[m]),
            "flops_per_image": flops[m],
        }
        for m in built
    ]
    kd = next(r for r in rows if r["method"] == "kd")
    for r in rows:
        r["time_vs_kd"] = r["seconds_per_step"] / kd["seconds_per_step"]
        r["flops_vs_kd"] = r["flops_per_image"] / kd["flops_per_image"]
        r["cost"] = r["time_vs_kd"] / r["flops_vs_kd"]
    return rows, errors


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
    ap.add_argument("--methods", default=None, help="comma-separated subset (kd is always measured)")
    ap.add_argument("--with-mimkd", action="store_true", help="also time mimkd (left out by default)")
    ap.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last")
    ap.add_argument("--out", default="results/speed_baselines")
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    fmt = torch.contiguous_format if args.contiguous else torch.channels_last
    registered = mimkd.distillers.available()
    if args.methods:
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in registered]
        if unknown:
            ap.error(f"unknown method(s) {unknown}; registered: {', '.join(registered)}")
    else:
        wanted = [m for m in registered if m != "mimkd" or args.with_mimkd]
    methods = ["kd", *[m for m in wanted if m != "kd"]]
    rows, errors = measure(methods, args, fmt)

    env = (
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, {'channels_last' if not args.contiguous else 'NCHW'}"
    )
    alloc = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc"
    lines = [
        f"# Baseline step speed: {args.teacher} -> {args.student}, batch {args.batch}, CPU",
        "",
        f"Measured by `benchmarks/bench_baselines_speed.py` ({env}, allocator {alloc}); median of "
        f"{args.steps} steps per method, the methods' steps interleaved, after {args.warmup} warm-up steps. "
        "FLOPs: torch FlopCounterMode over one training step (forward + backward; teacher forward only), "
        "per image. Every method with its default options; banks N = 50,000 (CRD K = 16384).",
        "",
        "| method | s / step (median) | min - max | GFLOPs / image (step) | time vs kd | FLOPs vs kd "
        "| time ratio / FLOP ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['seconds_per_step']:.3f} | {r['min_seconds']:.2f} - "
            f"{r['max_seconds']:.2f} | {r['flops_per_image'] / 1e9:.3f} | {r['time_vs_kd']:.3f}x | "
            f"{r['flops_vs_kd']:.3f}x | {r['cost']:.3f} |"
        )
    if errors:
        lines += ["", "Not measured:", ""]
        lines += [f"- {m}: {e}" for m, e in errors.items()]
    lines.append("")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines))
    out.with_suffix(".json").write_text(
        json.dumps({"rows": rows, "errors": errors, "env": env, "args": vars(args)}, indent=2) + "\n"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
