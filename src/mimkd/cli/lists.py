"""``mimkd models`` / ``methods`` / ``datasets``: what the registries hold."""

from __future__ import annotations

import argparse

__all__ = ["register"]

_LISTS = {"models": "list zoo models", "methods": "list methods", "datasets": "list datasets"}


def command(a: argparse.Namespace) -> int:
    if a.command == "models":
        from mimkd.models import available
    elif a.command == "methods":
        from mimkd.distillers import available
    else:
        from mimkd.data import available_datasets as available
    print("\n".join(available()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the three list commands to the ``mimkd`` subparsers."""
    for name, help_ in _LISTS.items():
        sub.add_parser(name, help=help_).set_defaults(fn=command)
