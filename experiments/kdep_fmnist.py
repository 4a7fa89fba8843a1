"""KDEP on the Fashion-MNIST stand-in: pre-train on the unlabelled 90 %, fine-tune on the labelled 10 %.

    python experiments/kdep_fmnist.py [--seeds 3] [--pretrain-epochs 3] [--alignments svd]
    python experiments/kdep_fmnist.py --seeds 1 --results results/kdep_alignments_fmnist \
        --alignments svd,svd-nopts,cs_var,cs_rand,interp,conv1x1_post_relu,conv1x1_pre_relu,conv1x1_margin

Protocol (stand-in scale; docs/methods/kdep.md):

1. **Pre-training** (``kdep``, labels withheld): teacher = the demo's ``cnn_teacher`` (92.73 %), student
   ``conv4mp_w32``, on the 54,000 training images that the demo's stratified 10 % leaves out
   (``data.train_subset=rest``), ``--pretrain-epochs`` epochs of the ``fashion_mnist`` preset (SGD lr 0.05,
   cosine, batch 64), one pre-training per seed. Features: the pre-ReLU output of each network's last
   conv block (student ``block4.1``, teacher ``block3.1``: the BatchNorm before the ReLU; these small models
   declare no pre-ReLU points, so they are named here), pooled; SVD of the teacher's 128 channels to the
   student's 32, PTS (T 0.1, n 3), loss weight 1.
2. **Fine-tuning** on the labelled 10 % (6,000 images), the demo's student recipe (15 epochs, lr 0.05
   cosine; KDEP's downstream preset is 150 epochs, too long here), ``full`` (every weight trains) and
   ``linear`` (frozen backbone, new classifier), each beside the same protocol from a random initialisation
   (``full`` from random = the demo's vanilla runs, reused when present).

Writes ``results/kdep_fmnist.md`` (and ``.json``). Not the paper's ImageNet numbers.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

FRACTION = 0.1
STUDENT, TEACHER = "conv4mp_w32", "cnn_teacher"
POINTS = {"student_point": "block4.1", "teacher_point": "block3.1"}  # the BatchNorms before the ReLUs
POST_RELU_POINTS = {"student_point": "block4", "teacher_point": "block3"}  # conv1x1_post_relu


def _base(name: str, seed: int, out: Path, epochs: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "out_dir": str(out / "runs"),
        "name": name,
        "data": {"name": "fashion_mnist", "train_fraction": FRACTION},
        "student": {"arch": STUDENT},
        "method": {"name": "vanilla"},
        "optim": {"recipe": "fashion_mnist", "epochs": epochs},
        "train": {"progress": False},
    }


def main() -> None:
    from mimkd.allocator import reexec_with_tcmalloc

    reexec_with_tcmalloc([__file__, *sys.argv[1:]])
    from runner import mean_std, run_configs, teacher_checkpoint, write_report

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--pretrain-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs")
    ap.add_argument(
        "--alignments",
        default="svd",
        help="comma-separated KDEP alignments to pre-train with (NAME-nopts: without PTS)",
    )
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--out", default="runs/kdep_fmnist")
    ap.add_argument("--reuse-demo", default="runs/demo/runs")
    ap.add_argument("--results", default="results/kdep_fmnist")
    args = ap.parse_args()
    out = Path(args.out)
    teacher = teacher_checkpoint()
    seeds = range(args.seeds)
    aligns = args.alignments.split(",")

    # 1. pre-training, labels withheld, on the images the labelled 10 % leaves out
    pre_jobs = []
    for a in aligns:
        for s in seeds:
            cfg = _base(f"pretrain_{a}_s{s}", s, out, args.pretrain_epochs)
            cfg["data"]["train_subset"] = "rest"
            align, _, flag = a.partition("-")  # "svd-nopts": the SVD alignment without PTS
            points = POST_RELU_POINTS if align == "conv1x1_post_relu" else POINTS
            cfg["method"] = {"name": "kdep", "alignment": align, "pts": flag != "nopts", **points}
            cfg["teacher"] = {"arch": TEACHER, "checkpoint": str(teacher)}
            pre_jobs.append((f"pretrain:{a}", cfg))
    pre = run_configs(pre_jobs, args.workers, desc="KDEP pre-training")

    # 2. fine-tuning on the labelled 10 %, from KDEP and from a random initialisation
    demo = Path(args.reuse_demo)
    for s in seeds:  # random init + full fine-tuning on the demo's protocol = the demo's vanilla runs
        src, dst = demo / f"vanilla_s{s}", out / "runs" / f"random_full_s{s}"
        if src.is_dir() and not dst.exists():
            shutil.copytree(src, dst)
    jobs = []
    for mode in ("full", "linear"):
        for s in seeds:
            if mode == "full":
                jobs.append((f"random:{mode}", _base(f"random_{mode}_s{s}", s, out, args.epochs)))
            else:  # a linear classifier on a frozen randomly initialised backbone
                cfg = _base(f"random_{mode}_s{s}", s, out, args.epochs)
                cfg["finetune"] = {"checkpoint": str(out / "runs" / f"init_s{s}" / "init.pt"), "mode": mode}
                _write_random_init(Path(cfg["finetune"]["checkpoint"]), s)
                jobs.append((f"random:{mode}", cfg))
            for a in aligns:
                cfg = _base(f"kdep_{a}_{mode}_s{s}", s, out, args.epochs)
                cfg["finetune"] = {"checkpoint": str(out / "runs" / f"pretrain_{a}_s{s}"), "mode": mode}
                jobs.append((f"kdep_{a}:{mode}", cfg))
    fine = run_configs(jobs, args.workers, desc="fine-tuning")

    lines = [
        f"Fashion-MNIST stand-in: KDEP pre-training of {STUDENT} from {TEACHER} on the unlabelled 90 % "
        f"({args.pretrain_epochs} epochs), then fine-tuning on the labelled {FRACTION:.0%} for {args.epochs} "
        f"epochs; {args.seeds} seeds (mean ± std of test top-1 %). Stand-in scale, not the paper's numbers.",
        "",
        "| initialisation | fine-tuning | last epoch | best epoch | gain vs random (last) "
        "| pre-train s/run |",
        "|---|---|---|---|---|---|",
    ]
    rows = []
    for mode in ("full", "linear"):
        ref = None
        for key in ["random", *(f"kdep_{a}" for a in aligns)]:
            runs = [r for r in fine[f"{key}:{mode}"] if r.get("status") == "finished"]
            last = [r["last"]["top1"] for r in runs]
            best = [r["best"]["top1"] for r in runs]
            mean = sum(last) / len(last) if last else float("nan")
            ref = mean if key == "random" else ref
            p = [r.get("wall_time_s", 0.0) for r in pre.get(f"pretrain:{key[5:]}", [])]
            rows.append({"init": key, "mode": mode, "last": last, "best": best})
            lines.append(
                f"| {key} | {mode} | {mean_std(last)} | {mean_std(best)} | "
                f"{'' if key == 'random' else f'{mean - ref:+.2f}'} | "
                f"{f'{sum(p) / len(p):.0f}' if p else ''} |"
            )
    text = "\n".join(lines) + "\n"
    # pre-training has no test accuracy (label-free): its runs' status only
    status = {k: [r.get("status") for r in v] for k, v in pre.items()}
    write_report(args.results, text, {"rows": rows, "pretrain_status": status, "args": vars(args)})


def _write_random_init(path: Path, seed: int) -> None:
    """A checkpoint of a randomly initialised student (seeded), for the random-backbone linear probe."""
    import torch

    from mimkd.checkpoint import atomic_save
    from mimkd.models import build_model

    if path.exists():
        return
    torch.manual_seed(seed)
    net = build_model(STUDENT, num_classes=10, in_channels=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"model": net.state_dict(), "arch": STUDENT, "in_channels": 1, "num_classes": 10}, path)


if __name__ == "__main__":
    main()
