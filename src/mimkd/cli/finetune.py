"""``mimkd finetune``: fine-tune a trained backbone on a dataset."""

from __future__ import annotations

import argparse

from ._common import add_run_flags, flags_to_config, print_summary

__all__ = ["register"]


def command(a: argparse.Namespace) -> int:
    from mimkd.engine.finetune import finetune_config
    from mimkd.engine.setup import run

    cfg = finetune_config(
        a.checkpoint,
        flags_to_config(a),
        a.config,
        a.overrides,
        mode=a.mode,
        preset=a.preset,
        arch=a.arch,
    )
    print_summary(run(cfg, resume=a.resume, overwrite=a.overwrite))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the command to the ``mimkd`` subparsers."""
    f = sub.add_parser(
        "finetune",
        help="fine-tune a trained backbone (KDEP pre-training, distilled or plain run) on a dataset",
        description="Build the architecture recorded in the checkpoint, load every weight but the classifier "
        "(the last nn.Linear, re-initialised for the dataset's classes) and train it as a vanilla run.",
    )
    f.add_argument("checkpoint", metavar="CKPT_OR_RUN_DIR", help="checkpoint file or run directory (last.pt)")
    f.add_argument(
        "--mode",
        choices=["linear", "full"],
        help="linear: frozen backbone (eval mode), only the classifier trains; full (default): everything",
    )
    f.add_argument(
        "--preset",
        choices=["kdep"],
        help="kdep: SGD 0.9, 150 epochs, batch 64, wd 5e-4, lr 0.01, /10 at 1/3 and 2/3 (KDEP supp. B.2)",
    )
    f.add_argument("--arch", help="architecture, for checkpoints that do not record it")
    add_run_flags(f)
    f.set_defaults(fn=command)
