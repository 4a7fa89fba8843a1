"""``mimkd distill``: distill a teacher into a student with a method."""

from __future__ import annotations

import argparse

from ._common import add_run_flags, flags_to_config, print_summary

__all__ = ["register"]


def command(a: argparse.Namespace) -> int:
    from mimkd.config import load_config
    from mimkd.engine.setup import run

    base = flags_to_config(a)
    if a.student:
        base.setdefault("student", {})["arch"] = a.student
    if a.teacher or a.teacher_arch:
        t = base.setdefault("teacher", {})
        t["arch"] = a.teacher_arch or "auto"
        if a.teacher:
            t["checkpoint"] = a.teacher
    if a.method:
        base.setdefault("method", {})["name"] = a.method
    cfg = load_config(a.config, a.overrides, base)
    print_summary(run(cfg, resume=a.resume, overwrite=a.overwrite))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the command to the ``mimkd`` subparsers."""
    d = sub.add_parser("distill", help="distill a teacher into a student with a method")
    d.add_argument(
        "--teacher",
        help="teacher checkpoint (a mimkd run, a {'model': state_dict} file, a Hub folder), a catalogue name "
        "(repdistiller:resnet32x4, torchvision:resnet34: mimkd teachers list) or hf:ORG/REPO",
    )
    d.add_argument("--teacher-arch", help="teacher architecture (needed when the checkpoint does not say)")
    d.add_argument("--student", help="student architecture")
    d.add_argument("--method", help="distillation method (mimkd methods lists them)")
    add_run_flags(d)
    d.set_defaults(fn=command)
