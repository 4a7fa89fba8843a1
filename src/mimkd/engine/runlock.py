"""One process per run directory: an OS-level lock that dies with its process.

``RunLock(run_dir)`` takes an exclusive ``fcntl.flock`` on ``OUT/.NAME.lock`` (beside the run directory,
so the lock survives the directory being moved aside by ``--overwrite``) and writes the holder's PID into
it. A second process gets a :class:`RunLockedError` naming the directory and the holder, or with
``wait=True`` blocks until the holder is done (``mimkd demo`` waits for a teacher another demo is
training). The kernel drops the lock when its process ends, however it ends (SIGKILL included), so a stale
lock file never blocks a resume.

Locks are re-entrant within a process: ``mimkd demo`` holds its teacher's lock while the run it starts
takes the same one. See ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from mimkd.errors import MimkdError

__all__ = ["RunLock", "RunLockedError", "lock_path"]

_HELD: dict[str, list[int]] = {}  # lock file -> [fd, depth] for the locks this process holds
_GUARD = threading.Lock()


class RunLockedError(MimkdError):
    """Another process holds the run directory."""


def lock_path(run_dir: str | Path) -> Path:
    """The lock file of ``run_dir``: ``.NAME.lock`` in its parent directory."""
    run_dir = Path(run_dir)
    return run_dir.parent / f".{run_dir.name}.lock"


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "unknown"
    return text or "unknown"


class RunLock:
    """An exclusive lock on a run directory, held from :meth:`acquire` to :meth:`release` (or a ``with``)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = lock_path(self.run_dir)
        self._key = ""
        self.held = False

    def acquire(self, wait: bool = False, on_wait: Callable[[str], None] | None = None) -> RunLock:
        """Take the lock; if another process holds it, raise (``wait=False``) or block until it is free
        (``on_wait(holder_pid)`` is called once before blocking)."""
        if self.held:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._key = str(self.path.resolve())
        with _GUARD:
            if self._key in _HELD:
                _HELD[self._key][1] += 1
                self.held = True
                return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(self.path)
                if not wait:
                    raise RunLockedError(
                        f"run directory {str(self.run_dir)!r} is in use by another mimkd process (PID "
                        f"{holder}); wait for it to finish, or stop it and pass --resume to continue"
                    ) from None
                if on_wait is not None:
                    on_wait(holder)
                _blocking_flock(fd)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        with _GUARD:
            _HELD[self._key] = [fd, 1]
        self.held = True
        return self

    def release(self) -> None:
        """Drop one hold; the lock is freed when the outermost holder of this process releases it."""
        if not self.held:
            return
        self.held = False
        with _GUARD:
            entry = _HELD.get(self._key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _HELD[self._key]
        fd = entry[0]
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _blocking_flock(fd: int) -> None:
    """``flock(LOCK_EX)`` that stays interruptible by Ctrl-C (a plain blocking flock is, too, on Linux; the
    poll keeps the behaviour the same everywhere)."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(0.2)
