"""Run mimkd's processes under tcmalloc when the system has it.

glibc's malloc hands every allocation above 32 MB back to the kernel when it is freed, so each training step
page-faults its largest activations in again (MIMKD's 32x32 critics write several 268 MB tensors per step).
That makes the ops writing those tensors several times slower (timings: results/dev_cpu_notes.md).
tcmalloc keeps freed memory for reuse. PyTorch's own CPU launcher
(``torch.backends.xeon.run_cpu``) preloads it for the same reason; here the ``mimkd`` command re-executes
itself once with ``LD_PRELOAD`` set when ``libtcmalloc_minimal`` is installed (Debian:
``libtcmalloc-minimal4``, which ``scripts/setup.sh`` installs). ``MIMKD_ALLOCATOR=system`` turns it off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["find_tcmalloc", "reexec_with_tcmalloc"]

_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)


def find_tcmalloc() -> str | None:
    """Path of an installed tcmalloc shared library, or None."""
    for directory in (*_DIRS, os.path.join(sys.prefix, "lib")):
        for name in _NAMES:
            path = Path(directory) / name
            if path.is_file():
                return str(path)
    return None


def reexec_with_tcmalloc(argv: list[str]) -> None:
    """Replace this process by ``python argv...`` under tcmalloc, if available and not done yet.

    Call it only from a program's entry point, before torch is imported; it returns when nothing is to be
    done (not Linux, turned off, already preloaded, or no tcmalloc installed).
    """
    if sys.platform != "linux" or os.environ.get("MIMKD_ALLOCATOR", "tcmalloc") == "system":
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preload or os.environ.get("_MIMKD_REEXEC"):
        return
    lib = find_tcmalloc()
    if lib is None:
        return
    env = dict(os.environ, LD_PRELOAD=f"{lib}:{preload}".rstrip(":"), _MIMKD_REEXEC="1")
    try:
        os.execve(sys.executable, [sys.executable, *argv], env)
    except OSError:
        return  # keep going with the system allocator
