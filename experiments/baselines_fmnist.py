"""Every distillation method of the zoo on the Fashion-MNIST stand-in protocol (the demo's), 3 seeds each.

    python experiments/baselines_fmnist.py [--seeds 3] [--out runs/baselines_fmnist] [--workers 2]

The teacher (``cnn_teacher``, cached like the demo's), the student (``conv4mp_w32``), 10 % of the training
set, 15 epochs, SGD lr 0.05 cosine: ``mimkd demo``'s protocol until issue 16 (the demo now trains on 8 % for
20 epochs; ``--reuse-demo DIR`` copies finished runs of an older demo). Each baseline uses its
RepDistiller command-line weights (docs/methods/README.md). Init stages (AB, FT, FSP, two-stage
FitNets) are scaled with the schedule: RepDistiller's 30 init epochs before 240 main ones become 2 before
15. Methods that cannot apply to this pair (FSP: unequal channel counts) are reported as
failed with their error, like RepDistiller's "N/A". ``crd_k2048`` / ``wcord_k2048`` are CRD / WCoRD with K
scaled to the stand-in's training-set size (CRD's K/N ratio); every other row is the method's defaults.
``--methods vanilla,kd,crd,crd+kd,crd_k2048,wcord,wcord+kd,wcord_k2048 --results results/wcord_fmnist`` is
WCoRD beside CRD (issue 5).

Writes the table to ``results/baselines_fmnist.md`` (and ``.json``, ``.png``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

INIT_EPOCHS = 2  # 30/240 of RepDistiller's schedule, applied to the stand-in's 15 epochs

METHODS: dict[str, dict] = {
    "vanilla": {},
    "kd": {},
    "mimkd": {"critic_width": 32},  # as in the demo
    "fitnets": {},
    "fitnets_2stage": {"runs_as": "fitnets", "two_stage": True, "init_epochs": INIT_EPOCHS},
    "at": {},
    "sp": {},
    "cc": {},
    "vid": {},
    "rkd": {},
    "pkt": {},
    "ab": {"init_epochs": INIT_EPOCHS},
    "ft": {"init_epochs": INIT_EPOCHS},
    "fsp": {"init_epochs": INIT_EPOCHS},
    "nst": {},
    "crd": {},
    "crd+kd": {},
    # CRD's K = 16384 is a third of CIFAR-100's 50,000 samples; the stand-in has 6,000, so K > N and the
    # negatives repeat. This row keeps CRD's K/N ratio instead (16384 * 6000 / 50000 ~ 2048).
    "crd_k2048": {"runs_as": "crd", "num_negatives": 2048},
    "wcord": {},
    "wcord+kd": {},
    "wcord_k2048": {"runs_as": "wcord", "num_negatives": 2048},  # as crd_k2048
}


def main() -> None:
    from mimkd.allocator import reexec_with_tcmalloc

    reexec_with_tcmalloc([__file__, *sys.argv[1:]])
    from mimkd.demo import run_demo

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", default="runs/baselines_fmnist")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated rows of METHODS")
    ap.add_argument(
        "--reuse-demo", default=None, help="copy finished runs of a 10 %%/15-epoch demo from here"
    )
    ap.add_argument("--results", default="results/baselines_fmnist")
    args = ap.parse_args()
    methods = {m: METHODS[m] for m in args.methods.split(",")}
    out = Path(args.out)
    demo_runs = Path(args.reuse_demo) if args.reuse_demo else None
    if (
        demo_runs is not None and demo_runs.is_dir()
    ):  # same protocol and seeds: the demo's vanilla/kd/mimkd runs are these rows' runs
        for run in demo_runs.iterdir():
            target = out / "runs" / run.name
            if run.name.rsplit("_s", 1)[0] in methods and not target.exists():
                shutil.copytree(run, target)
    res = run_demo(
        out_dir=str(out),
        seeds=args.seeds,
        epochs=15,
        train_fraction=0.1,
        workers=args.workers,
        methods=methods,
        plot_name="baselines.png",
    )
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    table = (out / "results.md").read_text()
    # the harness reports this invocation's wall time, which is ~0 when every run was already finished
    run_minutes = sum(r["seconds_per_run"] * r["runs"] for r in res["rows"] if r["runs"]) / 60
    head, _, rest = table.partition("\n")
    head = head.split("; demo wall time")[0] + f"; {run_minutes:.0f} run-minutes in total (2 at a time)"
    table = head + "\n" + rest
    failed = {m: sorted(set(errors)) for m, errors in res["failures"].items()}
    notes = [f"- {m}: {'; '.join(e)}" for m, e in failed.items() if e]
    text = table + ("\n\nRuns that could not start:\n" + "\n".join(notes) if notes else "") + "\n"
    results.with_suffix(".md").write_text(text)
    results.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    shutil.copy(out / "baselines.png", results.with_suffix(".png"))
    print(f"wrote {results.with_suffix('.md')}")


if __name__ == "__main__":
    main()
