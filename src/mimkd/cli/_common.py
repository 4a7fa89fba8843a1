"""What the run commands (train, distill, finetune) share: the run flags and the summary they print."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_run_flags", "flags_to_config", "print_summary"]


def add_run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run")
    g.add_argument("--config", help="YAML run configuration; flags and --set override it")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set optim.lr=0.1 --set method.lambda_l=0.5 (repeatable)",
    )
    g.add_argument("--data", help="dataset name (mimkd datasets lists them)")
    g.add_argument("--data-root", help="dataset directory (default: the dataset's standard location)")
    g.add_argument("--train-fraction", type=float, help="stratified, seeded fraction of the training set")
    g.add_argument("--image-size", type=int, help="resize images to this size (folder datasets)")
    g.add_argument("--recipe", help="training recipe: cifar, imagenet, fashion_mnist (default: by dataset)")
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int)
    g.add_argument("--lr", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int, help="CPU threads for torch")
    g.add_argument("--out", help="directory that holds run directories (default: runs)")
    g.add_argument("--name", help="run directory name (default: METHOD_STUDENT_DATA_sSEED)")
    g.add_argument("--resume", action="store_true", help="continue the run in its directory from last.pt")
    g.add_argument("--overwrite", action="store_true", help="start the run over if its directory exists")
    g.add_argument(
        "--progress", dest="progress", action="store_true", default=None, help="always show the progress bar"
    )
    g.add_argument("--no-progress", dest="progress", action="store_false")


def flags_to_config(a: argparse.Namespace) -> dict[str, Any]:
    cfg: dict[str, Any] = {}

    def put(path: str, value: Any) -> None:
        if value is None:
            return
        node = cfg
        *parents, last = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value

    put("data.name", a.data)
    put("data.root", a.data_root)
    put("data.train_fraction", a.train_fraction)
    put("data.image_size", a.image_size)
    put("optim.recipe", a.recipe)
    put("optim.epochs", a.epochs)
    put("optim.batch_size", a.batch_size)
    put("optim.lr", a.lr)
    put("seed", a.seed)
    put("device", a.device)
    put("threads", a.threads)
    put("out_dir", a.out)
    put("name", a.name)
    put("train.progress", a.progress)
    return cfg


def _pct(x: Any) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) else "-"


def print_summary(s: dict[str, Any]) -> None:
    from mimkd.engine.distributed import is_main_process
    from mimkd.engine.summary import chance_top1, is_near_chance

    if not is_main_process():  # under torchrun every rank returns the summary: print it once
        return
    last, best = s.get("last") or {}, s.get("best") or {}
    lines = [f"method {s.get('method')}  student {s.get('student')}  data {s.get('data')}"]
    if s.get("teacher_test_top1") is not None:
        lines.append(f"  teacher {s.get('teacher')}: top-1 {s['teacher_test_top1']:.2f}")
    if s.get("evaluation"):
        lines.append(f"  {s['evaluation']}")
    else:
        epoch = last.get("epoch")
        lines += [
            f"  last epoch {epoch + 1 if epoch is not None else '-'}: top-1 {_pct(last.get('top1'))}  "
            f"top-5 {_pct(last.get('top5'))}",
            f"  best epoch {best.get('epoch', -1) + 1}: top-1 {_pct(best.get('top1'))}",
        ]
    for name, net in list((s.get("networks") or {}).items())[1:]:
        nb = net.get("best") or {}
        lines.append(
            f"  network {name} ({net.get('arch')}): last top-1 {_pct((net.get('last') or {}).get('top1'))}  "
            f"best top-1 {_pct(nb.get('top1'))}"
        )
    lines.append(f"  wall time {s.get('wall_time_s', 0):.0f} s")
    if is_near_chance(s):
        classes = s.get("num_classes")
        chance = f" ({chance_top1(classes):.2f} %)" if classes else ""
        lines.append(
            f"  WARNING: test accuracy {_pct(last.get('top1'))} % is near chance{chance}: too few steps, or "
            "a learning rate too high (or too low)"
        )
    print("\n".join(lines))
