"""``mimkd models`` / ``methods`` / ``datasets``: what the registries hold."""

from __future__ import annotations

import argparse

from mimkd.data import available_datasets
from mimkd.distillers import available as available_methods
from mimkd.models import available as available_models

__all__ = ["register"]

_LISTS = {
    "models": ("list zoo models", available_models),
    "methods": ("list methods", available_methods),
    "datasets": ("list datasets", available_datasets),
}


def command(a: argparse.Namespace) -> int:
    print("\n".join(_LISTS[a.command][1]()))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the three list commands to the ``mimkd`` subparsers."""
    for name, (help_, _) in _LISTS.items():
        sub.add_parser(name, help=help_).set_defaults(fn=command)
