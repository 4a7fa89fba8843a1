"""Images per second of zoo models on this machine: one training step and inference forward passes.

    python benchmarks/bench_models.py [--models resnet8x4,resnet32x4,conv4mp_w32,cnn_teacher] [--batch 64]

For each model: a training step (forward, cross-entropy, backward, SGD step) and an inference forward
(no grad, eval mode), in NCHW and channels_last memory formats; median of ``--steps`` timed iterations after
warm-up. Writes ``results/bench_models.md`` and ``.json``.
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
import torch.nn.functional as F

from mimkd.models import build_model

INPUT = {"conv4mp_w32": (1, 28, 10), "conv4mp": (1, 28, 10), "cnn_teacher": (1, 28, 10)}


def _time(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(name: str, batch: int, steps: int, fmt: torch.memory_format) -> dict:
    channels, size, classes = INPUT.get(name, (3, 32, 100))
    torch.manual_seed(0)
    model = build_model(name, num_classes=classes, in_channels=channels).to(memory_format=fmt)
    x = torch.randn(batch, channels, size, size).contiguous(memory_format=fmt)
    y = torch.randint(0, classes, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)

    def train_step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    t_train = _time(train_step, steps)
    model.eval()
    with torch.no_grad():
        t_fwd = _time(lambda: model(x), steps)
    return {
        "model": name,
        "input": [channels, size, size],
        "batch": batch,
        "format": "channels_last" if fmt == torch.channels_last else "NCHW",
        "train_images_per_s": batch / t_train,
        "forward_images_per_s": batch / t_fwd,
        "params": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    from mimkd.allocator import reexec_with_tcmalloc

    reexec_with_tcmalloc([__file__, *sys.argv[1:]])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet8x4,resnet32x4,conv4mp_w32,cnn_teacher")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="results/bench_models")
    args = ap.parse_args()
    rows = [
        bench(m, args.batch, args.steps, fmt)
        for m in args.models.split(",")
        for fmt in (torch.contiguous_format, torch.channels_last)
    ]
    alloc = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc"
    env = f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, {alloc}"
    lines = [
        f"# Zoo models: images/s on this CPU (batch {args.batch})",
        "",
        f"`benchmarks/bench_models.py` ({env}); median of {args.steps} iterations.",
        "",
        "| model | input | params | format | train step img/s | inference forward img/s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['input']))} | {r['params']:,} | {r['format']} | "
            f"{r['train_images_per_s']:.0f} | {r['forward_images_per_s']:.0f} |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
