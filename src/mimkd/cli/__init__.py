"""The ``mimkd`` command. Thin: it parses, validates and calls the library; one module per command.

Every user error (bad key, unknown model, missing file, corrupt checkpoint) is printed as one message and
exits with status 2; nothing prints a traceback unless ``MIMKD_DEBUG=1``. The command modules are imported
only when a command line is parsed (:func:`build_parser`), after :func:`entry` set the OpenMP policy and the
allocator.

Imports inside functions: in ``mimkd.cli`` only, and on purpose. A command module imports at module level
nothing but argparse, the standard library and :mod:`mimkd.errors`; each command function imports the
library it calls (torch, the engine, the models) when it runs. So ``mimkd --help`` and a command's
``--help`` parse without loading torch, and a test can patch a library function (``mimkd.demo.run_demo``)
that the command looks up when it runs. Library modules import at module level.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from mimkd.errors import MimkdError, install_warning_format

__all__ = ["main", "build_parser", "entry", "set_openmp_wait_policy", "COMMANDS"]

#: The command modules, in the order ``mimkd --help`` lists them; each has ``register(subparsers)``.
COMMANDS = (
    "train",
    "distill",
    "finetune",
    "latency",
    "export",
    "describe",
    "demo",
    "sweep",
    "report",
    "probe",
    "bench",
    "lists",
    "teachers",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mimkd",
        description="Knowledge distillation by mutual information maximisation, and the baseline zoo.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    install_warning_format()  # mimkd's warnings as one line each: "mimkd: warning: ..."
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.fn(args) or 0)
    except MimkdError as e:
        if os.environ.get("MIMKD_DEBUG"):
            raise
        print(f"mimkd: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("mimkd: interrupted; a run can be continued with --resume", file=sys.stderr)
        return 130


def set_openmp_wait_policy() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``.

    Measured on a 2-core machine (``results/engine_options_cpu.md``): libgomp's default (spin about 3 ms,
    then sleep) is 1.1-1.5x faster at 2 threads when the machine is idle, and 1.3-2.7x slower when one other
    process is busy on it (up to 16x under heavier load); passive waiting has the best worst case. On an idle
    machine, ``GOMP_SPINCOUNT=300000`` restores libgomp's default. Must run before torch is imported.
    """
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def entry() -> None:
    """The ``mimkd`` console command (and ``python -m mimkd``): tcmalloc if available, then :func:`main`.

    The OpenMP wait policy is set first, before torch loads (:func:`set_openmp_wait_policy`).
    """
    set_openmp_wait_policy()
    from mimkd.allocator import reexec_with_tcmalloc

    reexec_with_tcmalloc(["-m", "mimkd", *sys.argv[1:]])
    sys.exit(main())


if __name__ == "__main__":
    entry()
