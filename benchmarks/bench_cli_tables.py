"""Regenerate the committed CPU tables of ``mimkd bench`` (issue 7).

    python benchmarks/bench_cli_tables.py [resnet|demo ...]

Each table is exactly the ``mimkd bench`` command line printed before it runs (run through
:func:`mimkd.cli.main`, as the ``mimkd`` command does):

* ``results/bench_cpu_resnet32x4_resnet8x4.{md,json}``: resnet32x4 → resnet8x4, CIFAR-100 shape, batch 64,
  the student step, the teacher forward and every method with its default options.
* ``results/bench_cpu_demo_pair.{md,json}``: the demo pair (cnn_teacher → conv4mp_w32, Fashion-MNIST shape,
  batch 64): student, teacher, kd, crd and mimkd with the demo's settings: bank N = 6,000 (the demo's 10 %
  of the training set), mimkd with ``critic_width: 32``; the projection is the demo's student run (15 epochs
  × 6,000 images).

Threads: the resnet table uses both cores (2 threads, as ``results/speed_baselines.md``); the demo table one
thread, as the demo runs its students (one thread per run, as many runs in parallel as cores) and because a
2-thread step of this 28k-parameter student on a shared machine swings 10x (65 ms or 650 ms per step, the
second thread of each of its hundreds of small parallel regions waiting for a time slice). The load
average at start and end is in each table's header. Rows are measured round-robin in several rounds (3 for
the demo, 2 for resnet), the fastest round kept, so that a job starting midway slows one round and not the
table. The resnet table takes about 16 minutes on an idle machine (two rounds), the demo table 4.
"""

from __future__ import annotations

import shlex
import sys

TABLES: dict[str, list[str]] = {
    "resnet": [
        "--teacher", "resnet32x4", "--student", "resnet8x4", "--data", "cifar100", "--methods", "all",
        "--batch-size", "64", "--steps", "5", "--warmup", "2", "--row-seconds", "15", "--rounds", "2",
        "--device", "cpu", "--threads", "2", "--out", "results/bench_cpu_resnet32x4_resnet8x4",
    ],
    "demo": [
        "--teacher", "cnn_teacher", "--student", "conv4mp_w32", "--data", "fashion_mnist",
        "--num-train", "6000", "--methods", "kd,crd,mimkd", "--set", "mimkd.critic_width=32",
        "--batch-size", "64", "--steps", "20", "--warmup", "3", "--row-seconds", "10", "--rounds", "3",
        "--device", "cpu", "--threads", "1", "--project-epochs", "15", "--project-images", "6000",
        "--out", "results/bench_cpu_demo_pair",
    ],
}  # fmt: skip


def main() -> int:
    from mimkd.allocator import reexec_with_tcmalloc
    from mimkd.cli import set_openmp_wait_policy

    set_openmp_wait_policy()  # as the mimkd command does, before torch loads
    reexec_with_tcmalloc([__file__, *sys.argv[1:]])  # as the mimkd command does (see mimkd.allocator)
    from mimkd.cli import main as mimkd_main

    which = sys.argv[1:] or list(TABLES)
    unknown = [w for w in which if w not in TABLES]
    if unknown:
        sys.exit(f"unknown table(s) {unknown}; choose from {', '.join(TABLES)}")
    for name in which:
        argv = ["bench", *TABLES[name]]
        print("$ mimkd " + shlex.join(argv), flush=True)
        rc = mimkd_main(argv)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
