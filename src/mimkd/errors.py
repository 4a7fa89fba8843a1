"""Errors that mimkd raises for bad input.

Every error a user can cause (a typo in a config, a wrong path, an unknown model, a corrupt file, a checkpoint
that does not fit) is a :class:`MimkdError`: the CLI prints its message and exits with status 2 instead of a
traceback. The message names the problem and, where there is one, the fix.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MimkdError(Exception):
    """Base class of every user-facing mimkd error."""


class ConfigError(MimkdError, ValueError):
    """A configuration value or key is invalid."""


class DataError(MimkdError, ValueError):
    """A dataset is missing, truncated, corrupt or in the wrong format."""


class ModelError(MimkdError, ValueError):
    """An unknown model, or a model that does not fit the request."""


class CheckpointError(MimkdError, ValueError):
    """A checkpoint is missing, corrupt or does not match the architecture."""


class MethodError(MimkdError, ValueError):
    """A distillation method cannot be built for the given networks or options."""


class NonFiniteLossError(MimkdError, FloatingPointError):
    """A loss term became NaN or infinite."""


def did_you_mean(name: str, choices: Iterable[str], n: int = 3) -> str:
    """Return ' Did you mean: a, b?' for the closest valid names, or '' when none is close."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[c] for c in difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)]
    return f" Did you mean: {', '.join(close)}?" if close else ""


def unknown_name_error(kind: str, name: str, choices: Iterable[str], cls: type[MimkdError] = MimkdError):
    """Build the standard 'unknown X' error with suggestions and the list of valid names."""
    choices = sorted(choices)
    return cls(f"unknown {kind} {name!r}.{did_you_mean(name, choices)} Valid {kind}s: {', '.join(choices)}")
