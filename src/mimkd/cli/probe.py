"""The ``mimkd probe`` command (argument parsing only; the probe is :mod:`mimkd.engine.linear_probe`)."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def command(a: argparse.Namespace) -> int:
    """``mimkd probe``: run :func:`linear_probe`, print one line, write the JSON result."""
    from mimkd.engine.linear_probe import linear_probe, write_probe_result
    from mimkd.evaluation.probe import default_output

    result = linear_probe(
        a.checkpoint,
        a.data,
        a.data_root,
        epochs=a.epochs,
        lr=a.lr,
        batch_size=a.batch_size,
        weight_decay=a.weight_decay,
        seed=a.seed,
        device=a.device,
        threads=a.threads,
        train_fraction=a.train_fraction,
        image_size=a.image_size,
        mean=a.mean,
        std=a.std,
    )
    out = write_probe_result(result, a.out or default_output(a.checkpoint, result["dataset"]))
    print(
        f"probe {result['arch']} on {result['dataset']}: test top-1 {result['test_top1']:.2f}  "
        f"train top-1 {result['train_top1']:.2f}  ({result['feature_dim']}-d features, "
        f"{result['train_images']}/{result['test_images']} images, {result['epochs']} epochs, "
        f"{result['seconds']:.1f} s) -> {out}"
    )
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``probe`` subcommand to ``subparsers`` (the ``add_subparsers()`` of the ``mimkd`` parser)."""
    p = subparsers.add_parser(
        "probe",
        help="linear-probe transfer: a linear classifier on a frozen student's features of another dataset",
        description="Freeze the student of a checkpoint, extract its pre-classifier features (the input of "
        "its final nn.Linear) for a dataset's train and test splits — resized to the student's input size, "
        "channels converted, normalised as the student was trained — and train a linear classifier on them "
        "(SGD momentum 0.9, lr x0.1 at 60% and 80% of the epochs). Prints the test top-1 and writes JSON.",
    )
    p.add_argument(
        "checkpoint", metavar="CKPT_OR_RUN_DIR", help="checkpoint file, or run directory (its last.pt)"
    )
    p.add_argument("--data", required=True, help="probe dataset (mimkd datasets lists them)")
    p.add_argument("--data-root", help="probe dataset directory (default: the dataset's standard location)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-fraction", type=float, default=1.0, help="stratified fraction of the train split")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument(
        "--image-size", type=int, help="student input size (default: recorded in the checkpoint's run)"
    )
    p.add_argument("--mean", type=_floats, help="student normalisation mean, e.g. 0.507,0.487,0.441")
    p.add_argument("--std", type=_floats, help="student normalisation std (default: its training dataset's)")
    p.add_argument("--out", help="result JSON (default: probe_<data>.json in the checkpoint's run directory)")
    p.set_defaults(fn=command)
    return p
