"""Claiming a run directory: one process at a time, ``--resume``/``--overwrite`` rules, nothing lost.

:func:`claimed` is a context manager around a run's training:

1. the directory's lock is taken (:class:`~mimkd.engine.runlock.RunLock`; rank 0 of a torchrun launch, the
   outcome shared with every rank) and held to the end;
2. the leftovers of an ``--overwrite`` that was killed are settled (see below);
3. the rules: a directory that holds a run (``last.pt`` or ``summary.json``) needs ``--resume`` or
   ``--overwrite``; ``--resume`` needs something to resume and the configuration it started with (keys that
   may change are :data:`RESUME_FREE`); a directory left by a run that failed before its first checkpoint
   holds nothing to lose and is reused;
4. ``--overwrite`` moves the old run aside to ``OUT/.NAME.overwritten`` (the new run was already built and
   probed by :func:`~mimkd.engine.setup.prepare`); it is deleted when the new run finishes, or as soon as the
   new run fails after writing its own ``last.pt`` (the new run can then be resumed). If the new run fails
   before that, the old run is put back. A process killed in between leaves the hidden copy: the next claim of
   the directory puts it back when the new run has no checkpoint, and deletes it otherwise;
5. a fresh run that fails before its first checkpoint removes the directory it created, so a rerun is not
   blocked by a half-made directory.

See ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml

from mimkd.errors import ConfigError, MimkdError

from . import distributed
from .distributed import DistInfo
from .runlock import RunLock

__all__ = ["claimed", "aside_path", "RESUME_FREE", "config_diffs", "Resume"]

Resume = bool | Literal["auto"]  # "auto": continue when there is a checkpoint, else start (demo, sweeps)

#: configuration keys that may change between a run and its resumption
RESUME_FREE = {
    "device",
    "threads",
    "train.progress",
    "train.tensorboard",
    "train.loggers",  # which trackers mirror the metrics (docs/trackers.md)
    "train.log_checkpoints",
    "train.measure_latency",
    "train.compile",
    "train.data_on_device",
    "train.nonfinite_check",
    "data.root",
    "out_dir",
}


def aside_path(run_dir: Path) -> Path:
    """Where ``--overwrite`` keeps the old run until the new one has made progress."""
    return run_dir.parent / f".{run_dir.name}.overwritten"


def _note(text: str) -> None:
    print(f"mimkd: {text}", file=sys.stderr, flush=True)


def _holds_run(run_dir: Path) -> bool:
    return (run_dir / "last.pt").exists() or (run_dir / "summary.json").exists()


def _settle_killed_overwrite(run_dir: Path) -> None:
    aside = aside_path(run_dir)
    if not aside.exists():
        return
    if (run_dir / "last.pt").exists():  # the new run made progress: it is the run now
        shutil.rmtree(aside, ignore_errors=True)
        return
    if run_dir.exists():
        shutil.rmtree(run_dir)
    os.replace(aside, run_dir)
    _note(
        f"restored {str(run_dir)!r}: an earlier --overwrite of it stopped before the new run's first "
        "checkpoint"
    )


def _check(run_dir: Path, cfg_dump: dict[str, Any], resume: Resume, overwrite: bool) -> None:
    if resume is True and overwrite:
        raise ConfigError("pass either --resume (continue the run) or --overwrite (start it over), not both")
    holds = _holds_run(run_dir)
    if holds and not (resume or overwrite):
        raise ConfigError(
            f"run directory {str(run_dir)!r} already holds a run: pass --resume to continue it, --overwrite "
            "to start over, or --name to choose another"
        )
    if resume is True and not (run_dir / "last.pt").exists():
        if not (run_dir / "config.yaml").exists():
            raise ConfigError(
                f"nothing to resume: {str(run_dir)!r} holds no run; check --out and --name, or start it "
                "without --resume"
            )
        _note(f"{str(run_dir)!r} has no checkpoint yet (stopped before its first): starting from the start")
    cfg_file = run_dir / "config.yaml"
    if resume and (run_dir / "last.pt").exists() and cfg_file.exists():
        try:
            old = yaml.safe_load(cfg_file.read_text()) or {}
        except yaml.YAMLError:
            old = {}
        diffs = config_diffs(old, cfg_dump) if isinstance(old, dict) else []
        if diffs:
            raise ConfigError(
                f"cannot resume {str(run_dir)!r}: the configuration differs from the one it started with: "
                + "; ".join(diffs[:10])
            )


def _write_config(run_dir: Path, cfg_dump: dict[str, Any]) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / ".config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(cfg_dump, sort_keys=False))
        os.replace(tmp, run_dir / "config.yaml")
    except OSError as e:
        raise ConfigError(f"cannot write to run directory {str(run_dir)!r}: {e.strerror or e}") from None


def _lock(run_dir: Path, info: DistInfo) -> RunLock | None:
    """Rank 0 takes the lock; every rank raises the same error if it cannot."""
    lock, err = None, None
    if info.is_main:
        try:
            lock = RunLock(run_dir).acquire()
        except (MimkdError, OSError) as e:
            err = (
                str(e)
                if isinstance(e, MimkdError)
                else f"cannot write to run directory {str(run_dir)!r} ({e.strerror or e}); choose another "
                "--out directory or fix its permissions"
            )
    err = distributed.broadcast_object(err) if info.enabled else err
    if err:
        raise ConfigError(err)
    return lock


@contextlib.contextmanager
def claimed(
    run_dir: Path,
    cfg_dump: dict[str, Any],
    resume: Resume,
    overwrite: bool,
    info: DistInfo = distributed.SINGLE,
) -> Iterator[None]:
    """Hold ``run_dir`` for the body (see the module docstring); ``cfg_dump`` becomes its config.yaml."""
    run_dir = Path(run_dir)
    lock = _lock(run_dir, info)
    try:
        if info.is_main:
            _settle_killed_overwrite(run_dir)
        distributed.barrier()
        _check(run_dir, cfg_dump, resume, overwrite)  # every rank looks before rank 0 writes
        distributed.barrier()
        moved, created = False, not run_dir.exists()
        if info.is_main:
            if overwrite and not resume and _holds_run(run_dir):
                os.replace(run_dir, aside_path(run_dir))
                moved, created = True, True
            _write_config(run_dir, cfg_dump)
        distributed.barrier()
        try:
            yield
        except BaseException as e:
            if info.is_main:
                _after_failure(run_dir, e, moved, created)
            raise
        if info.is_main and moved:
            shutil.rmtree(aside_path(run_dir), ignore_errors=True)
    finally:
        if lock is not None:
            lock.release()


def _after_failure(run_dir: Path, e: BaseException, moved: bool, created: bool) -> None:
    """The new run failed: put an overwritten run back, or remove a directory that holds nothing."""
    progressed = _holds_run(run_dir)
    if moved and not progressed:
        shutil.rmtree(run_dir, ignore_errors=True)
        os.replace(aside_path(run_dir), run_dir)
        _amend(
            e,
            "(--overwrite: the new run failed before its first checkpoint; the previous run in "
            f"{str(run_dir)!r} is kept)",
        )
    elif moved:
        shutil.rmtree(aside_path(run_dir), ignore_errors=True)
    elif created and not progressed:
        shutil.rmtree(run_dir, ignore_errors=True)


def _amend(e: BaseException, text: str) -> None:
    if isinstance(e, MimkdError) and e.args:
        e.args = (f"{e.args[0]} {text}", *e.args[1:])
    elif isinstance(e, KeyboardInterrupt):
        _note(text.strip("()"))


def config_diffs(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every configuration key that differs, except :data:`RESUME_FREE`."""
    out = []
    for k in sorted(set(old) | set(new)):
        key = f"{prefix}{k}"
        if key in RESUME_FREE:
            continue
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diffs(a, b, key + ".")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out
