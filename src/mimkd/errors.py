"""Errors that mimkd raises for bad input.

Every error a user can cause (a typo in a config, a wrong path, an unknown model, a corrupt file, a checkpoint
that does not fit) is a :class:`MimkdError`: the CLI prints its message and exits with status 2 instead of a
traceback. The message names the problem and, where there is one, the fix.
"""

from __future__ import annotations

import contextlib
import difflib
import sys
import warnings
from collections.abc import Iterable
from typing import Any, TextIO


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


class MimkdWarning(UserWarning):
    """A warning mimkd gives the user (a fallback it took, a setting it could not honour exactly).

    Once :func:`install_warning_format` ran (the CLI and the sweep workers call it), it is printed as one line
    ``mimkd: warning: <message>`` on stderr, without the file name and source line Python adds."""


def install_warning_format() -> None:
    """Make :mod:`warnings` print a :class:`MimkdWarning` as the one line ``mimkd: warning: <message>``.

    Every other category is shown as before; filters (``-W``, ``warnings.simplefilter``) and recording
    (``warnings.catch_warnings(record=True)``, ``pytest.warns``) work as usual. Calling it again does nothing.
    """
    previous = warnings.showwarning
    if getattr(previous, "_mimkd_one_line", False):
        return

    def show(
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        if not issubclass(category, MimkdWarning):
            previous(message, category, filename, lineno, file, line)
            return
        out = sys.stderr if file is None else file
        if out is None:  # no stderr (pythonw): nowhere to show it
            return
        with contextlib.suppress(OSError):  # stderr closed: the warning cannot be shown
            out.write(f"mimkd: warning: {' '.join(str(message).split())}\n")

    shown: Any = show
    shown._mimkd_one_line = True
    warnings.showwarning = shown


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
