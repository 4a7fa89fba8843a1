"""``mimkd describe``: feature pairs, critic shapes, parameters and FLOPs of a method."""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]


def command(a: argparse.Namespace) -> int:
    from mimkd.describe import describe, format_description

    info = describe(
        a.method, a.student, a.teacher, data=a.data, image_size=a.image_size, overrides=a.overrides
    )
    print(json.dumps(info, indent=2) if a.json else format_description(info))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the command to the ``mimkd`` subparsers."""
    s = sub.add_parser("describe", help="feature pairs, critic shapes, parameters and FLOPs of a method")
    s.add_argument("--teacher", help="teacher architecture (not for dml/dcm)")
    s.add_argument("--student", required=True, help="student architecture")
    s.add_argument("--method", default="mimkd")
    s.add_argument("--data", default="cifar100", help="dataset whose input shape and classes to assume")
    s.add_argument("--image-size", type=int)
    s.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="method option, e.g. --set method.critic_width=256",
    )
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=command)
