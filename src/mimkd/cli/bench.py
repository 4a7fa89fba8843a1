"""``mimkd bench``: images/s, peak memory and FLOP efficiency of each method's training step."""

from __future__ import annotations

import argparse
import json
import sys

from mimkd.errors import ConfigError

__all__ = ["register"]


def command(a: argparse.Namespace) -> int:
    """Run ``mimkd bench`` from parsed arguments."""
    from mimkd.bench.report import derive, method_options, parse_input_shape, resolve_methods, write_report
    from mimkd.bench.timing import BenchSetup, benchmark
    from mimkd.data import dataset_spec
    from mimkd.engine.setup import resolve_device

    methods = resolve_methods(a.methods)
    if a.bank_size is not None:
        return bank_command(a, methods)
    if not a.teacher or not a.student:
        raise ConfigError(
            "mimkd bench needs --teacher and --student (architectures), or --bank-size N for the "
            "memory-bank projection alone"
        )
    spec = dataset_spec(a.data or "cifar100") if a.data or not a.input_shape else None
    if a.input_shape:
        shape = parse_input_shape(a.input_shape)
    else:
        shape = (spec.channels, spec.image_size or 224, spec.image_size or 224)
    classes = a.num_classes or (spec.num_classes if spec else None) or 100
    num_train = a.num_train or (spec.train_size if spec else None) or 50000
    for flag, v in (("--steps", a.steps), ("--batch-size", a.batch_size), ("--rounds", a.rounds)):
        if v < 1:
            raise ConfigError(f"{flag} must be >= 1, got {v}")
    dev = resolve_device(a.device)
    setup = BenchSetup(
        teacher=a.teacher,
        student=a.student,
        input_shape=shape,
        num_classes=classes,
        num_train=num_train,
        batch_size=a.batch_size,
        steps=a.steps,
        warmup=max(1, a.warmup),
        device=str(dev),
        threads=a.threads,
        channels_last=not a.contiguous,
        options=method_options(a.overrides, methods),
        row_seconds=a.row_seconds,
        ceiling_n=a.ceiling_size,
        precision=a.precision,
        compile=a.compile,
    )
    report = benchmark(
        setup,
        methods,
        isolate=False if a.no_isolate else None,
        max_batch=a.max_batch,
        max_batch_limit=a.max_batch_limit,
        rounds=a.rounds,
        progress=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True),
    )
    derive(report, a.project_epochs, a.project_images)
    out = a.out or f"runs/bench/{dev.type}_{a.teacher}_{a.student}_b{a.batch_size}"
    md, js = write_report(report, out)
    print(md.read_text(), end="")
    print(f"wrote {md} and {js}")
    return 0


def bank_command(a: argparse.Namespace, methods: list[str]) -> int:
    """``mimkd bench --bank-size N``: one measured bank step per method with a memory bank, and its
    projected share of an epoch of N images (docs/methods/crd.md)."""
    from pathlib import Path

    from mimkd.bench.bank import BANKS, bank_report, projection_rows

    if a.bank_size < 2:
        raise ConfigError(f"--bank-size must be >= 2 (training samples), got {a.bank_size}")
    chosen = [m.split(":")[0] for m in methods]
    if not any(m in BANKS for m in chosen):
        raise ConfigError(
            f"--bank-size: none of --methods {a.methods!r} keeps a memory bank (those that do: "
            f"{', '.join(sorted(BANKS))})"
        )
    print(f"[bench] memory banks at N = {a.bank_size:,}, batch {a.batch_size} ...", file=sys.stderr)
    from mimkd.engine.setup import resolve_device

    device = str(resolve_device(a.device))
    rows = projection_rows(a.bank_size, a.batch_size, chosen, threads=a.threads, device=device)
    out = Path(a.out or f"runs/bench/banks_n{a.bank_size}_b{a.batch_size}")
    md = bank_report(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(md, end="")
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")
    return 0


def register(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``bench`` to ``sub`` (the ``mimkd`` subparsers); returns the new parser."""
    b = sub.add_parser(
        "bench",
        help="images/s, peak memory and FLOP efficiency of student, teacher and each method's step",
        description="Time the student's training step, the teacher's forward and each method's training "
        "step on synthetic batches already on the device; write OUT.md and OUT.json.",
    )
    b.add_argument("--teacher", help="teacher architecture (zoo name or module:factory)")
    b.add_argument("--student", help="student architecture")
    b.add_argument(
        "--bank-size",
        type=int,
        help="instead: time one memory-bank step of each method with a bank at N training samples and "
        "project its cost per epoch (no teacher or student needed)",
    )
    b.add_argument("--methods", default="kd,crd,mimkd", help="comma-separated methods, or 'all'")
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--max-batch", action="store_true", help="CUDA: each row at the largest batch that fits")
    b.add_argument("--max-batch-limit", type=int, default=32768, help="largest batch --max-batch tries")
    b.add_argument("--data", help="dataset whose shape, classes and size to assume (default: cifar100)")
    b.add_argument("--input-shape", help="CxHxW instead of a dataset's, e.g. 3x32x32")
    b.add_argument("--num-classes", type=int, help="classes (default: the dataset's, else 100)")
    b.add_argument("--num-train", type=int, help="training-set size for memory banks (default: the data's)")
    b.add_argument("--steps", type=int, default=20, help="timed steps per row")
    b.add_argument("--warmup", type=int, default=5, help="untimed steps first (one of them counts FLOPs)")
    b.add_argument("--row-seconds", type=float, help="stop timing a row after this long (>= 3 steps)")
    b.add_argument(
        "--rounds", type=int, default=1, help="measure each row N times, round-robin; keep the fastest"
    )
    b.add_argument("--ceiling-size", type=int, help="side of the ceiling's matmul (2048 CPU, 8192 CUDA)")
    b.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    b.add_argument("--threads", type=int, help="CPU threads for torch")
    b.add_argument("--contiguous", action="store_true", help="NCHW instead of channels_last")
    b.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="as train.precision")
    b.add_argument("--compile", action="store_true", help="torch.compile, as train.compile")
    b.add_argument("--no-isolate", action="store_true", help="CPU: all rows in this process (no memory)")
    b.add_argument("--project-epochs", type=int, default=240, help="epochs of the projected wall time")
    b.add_argument("--project-images", type=int, default=50000, help="images per epoch of the projection")
    b.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option: method.KEY=V (each method with KEY) or NAME.KEY=V (e.g. mimkd.critic_width=32)",
    )
    b.add_argument("--out", help="output path without suffix (default: runs/bench/DEVICE_T_S_bBATCH)")
    b.set_defaults(fn=command)
    return b
