"""``mimkd train``: train one network (a teacher, or a vanilla student)."""

from __future__ import annotations

import argparse

from mimkd.errors import MimkdError

from ._common import add_run_flags, flags_to_config, print_summary

__all__ = ["register"]


def command(a: argparse.Namespace) -> int:
    from mimkd.config import load_config
    from mimkd.engine.setup import run

    base = flags_to_config(a)
    if a.model:
        base.setdefault("student", {})["arch"] = a.model
    base.setdefault("method", {}).setdefault("name", "vanilla")
    cfg = load_config(a.config, a.overrides, base)
    if cfg.method.name != "vanilla" or cfg.teacher is not None:
        raise MimkdError("mimkd train trains one network without a teacher; use mimkd distill for methods")
    print_summary(run(cfg, resume=a.resume, overwrite=a.overwrite))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the command to the ``mimkd`` subparsers."""
    t = sub.add_parser("train", help="train one network (a teacher, or a vanilla student)")
    t.add_argument("--model", help="zoo name (mimkd models) or package.module:factory")
    add_run_flags(t)
    t.set_defaults(fn=command)
